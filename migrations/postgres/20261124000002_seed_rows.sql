-- Seed rows: the roles, the permissions each role has, the common data types and a few
-- exercises that use them. Later migrations add to these; they never rewrite them.

INSERT INTO roles (id, name, description) VALUES
    (1, 'user',         'a person who records sessions and reads their own data'),
    (2, 'guardian',     'a parent or guardian who may read their consenting children''s data'),
    (3, 'practitioner', 'a clinician or coach who may read their consenting patients'' data'),
    (4, 'admin',        'operates biofeed: users, devices, relationships; every admin read is audited'),
    (5, 'analyst',      'queries pseudonymous aggregates in ClickHouse; reads no individual''s data via the API');

INSERT INTO permissions (id, name, description) VALUES
    (1,  'points.write',          'post points from one''s own devices'),
    (2,  'sessions.manage_own',   'open, complete and abort one''s own sessions'),
    (3,  'data.read_own',         'read one''s own sessions, points and metrics'),
    (4,  'data.read_followers',   'read the data of people who consented through a relationship'),
    (5,  'relationships.manage',  'invite, accept and revoke relationships'),
    (6,  'profile.manage_own',    'read, change, export and erase one''s own profile'),
    (7,  'users.manage',          'create, list and erase users'),
    (8,  'devices.manage',        'create, list and revoke devices of any user'),
    (9,  'audit.read',            'read the audit log of any user'),
    (10, 'analytics.query',       'query pseudonymous aggregates'),
    (11, 'pii.reveal',            'see plaintext PII in admin listings (each use is audited)');

INSERT INTO role_permissions (role_id, permission_id)
SELECT r.id, p.id
FROM (VALUES
    ('user',         'points.write'), ('user', 'sessions.manage_own'), ('user', 'data.read_own'),
    ('user',         'relationships.manage'), ('user', 'profile.manage_own'),
    ('guardian',     'points.write'), ('guardian', 'sessions.manage_own'), ('guardian', 'data.read_own'),
    ('guardian',     'relationships.manage'), ('guardian', 'profile.manage_own'),
    ('guardian',     'data.read_followers'),
    ('practitioner', 'points.write'), ('practitioner', 'sessions.manage_own'), ('practitioner', 'data.read_own'),
    ('practitioner', 'relationships.manage'), ('practitioner', 'profile.manage_own'),
    ('practitioner', 'data.read_followers'),
    ('admin',        'users.manage'), ('admin', 'devices.manage'), ('admin', 'audit.read'),
    ('admin',        'relationships.manage'), ('admin', 'profile.manage_own'), ('admin', 'pii.reveal'),
    ('analyst',      'analytics.query'), ('analyst', 'profile.manage_own')
) AS grants (role_name, permission_name)
JOIN roles r ON r.name = grants.role_name
JOIN permissions p ON p.name = grants.permission_name;

INSERT INTO data_types (id, name, description, unit, channels, sample_rate_hz, min_value, max_value, metadata) VALUES
    (1, 'rr_interval',   'interval between successive heart beats (HRV source)', 'ms', 1, NULL, 200, 2500,
        '{"kind": "event", "channels": ["rr"]}'),
    (2, 'heart_rate',    'heart rate',                                          'bpm', 1, 1, 20, 250,
        '{"channels": ["hr"]}'),
    (3, 'spo2',          'peripheral oxygen saturation (pulse oximetry)',       '%', 1, 1, 50, 100,
        '{"channels": ["spo2"]}'),
    (4, 'ppg',           'photoplethysmogram, red and infrared (pulse oximetry raw)', 'a.u.', 2, 100, -100000, 100000,
        '{"channels": ["red", "infrared"]}'),
    (5, 'eeg',           'electroencephalogram, 8 channels, 10-20 positions',   'µV', 8, 256, -2000, 2000,
        '{"channels": ["Fp1", "Fp2", "C3", "C4", "P3", "P4", "O1", "O2"]}'),
    (6, 'ecg',           'electrocardiogram, single lead',                      'mV', 1, 500, -10, 10,
        '{"channels": ["lead_i"]}'),
    (7, 'eda',           'electrodermal activity (skin conductance)',           'µS', 1, 4, 0, 100,
        '{"channels": ["scl"]}'),
    (8, 'respiration',   'respiration belt stretch',                            'a.u.', 1, 25, -1000, 1000,
        '{"channels": ["belt"]}'),
    (9, 'skin_temperature', 'peripheral skin temperature',                      '°C', 1, 4, 15, 45,
        '{"channels": ["temp"]}');

INSERT INTO exercises (name, description) VALUES
    ('resonance_breathing', 'paced breathing at about six breaths a minute with HRV feedback'),
    ('hrv_biofeedback',     'heart-rate variability biofeedback'),
    ('alpha_neurofeedback', 'EEG alpha-band neurofeedback'),
    ('relaxation',          'guided relaxation with skin conductance and temperature feedback'),
    ('breath_hold',         'breath-hold training with pulse oximetry');

INSERT INTO exercise_data_types (exercise_id, data_type_id)
SELECT e.id, d.id
FROM (VALUES
    ('resonance_breathing', 'rr_interval'), ('resonance_breathing', 'respiration'), ('resonance_breathing', 'heart_rate'),
    ('hrv_biofeedback',     'rr_interval'), ('hrv_biofeedback', 'heart_rate'), ('hrv_biofeedback', 'ecg'),
    ('alpha_neurofeedback', 'eeg'),
    ('relaxation',          'eda'), ('relaxation', 'skin_temperature'), ('relaxation', 'heart_rate'),
    ('breath_hold',         'spo2'), ('breath_hold', 'ppg'), ('breath_hold', 'heart_rate')
) AS links (exercise_name, data_type_name)
JOIN exercises e ON e.name = links.exercise_name
JOIN data_types d ON d.name = links.data_type_name;
