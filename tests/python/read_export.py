"""Reads a biofeed session export back with tools other than biofeed's and compares it with
what was sent (a JSON file the Rust test writes). Exits non-zero naming the first difference.

    read_export.py edf|csv|rr EXPORT SENT.json

SENT.json: {"t_us": [...], "values": [[...], ...], "labels": [...], "unit": "µV",
            "rate": 256, "min": -2000, "max": 2000, "patient_code": "…",
            "annotations": ["session start", …], "absent": ["Anna", "1990-05-17", …]}

"absent": texts no file may hold; a birth date (YYYY-MM-DD) in any of the forms it could be
written in (see absent_forms).
"""

import csv
import datetime
import json
import re
import sys

import numpy as np


def fail(message):
    print(message, file=sys.stderr)
    sys.exit(1)


MONTHS = ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"]


def absent_forms(sent):
    """(text, bytes) pairs: the bytes no file may hold, and which text of sent["absent"] they
    are a form of. Each text as it is, and each date (YYYY-MM-DD) among them also as 19900517,
    17-MAY-1990 (EDF+), 17-May-1990, 17.05.1990, 17.05.90, 17/05/1990, 05/17/1990 and
    1990/05/17. Whole dates only: a year or a few digits alone turn up by chance in binary
    samples, hex labels and microsecond onsets."""
    pairs = []
    for text in sent["absent"]:
        forms = [text]
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            y, m, d = text.split("-")
            month = MONTHS[int(m) - 1]
            forms += [
                f"{y}{m}{d}",
                f"{d}-{month}-{y}",
                f"{d}-{month.capitalize()}-{y}",
                f"{d}.{m}.{y}",
                f"{d}.{m}.{y[2:]}",
                f"{d}/{m}/{y}",
                f"{m}/{d}/{y}",
                f"{y}/{m}/{d}",
            ]
        pairs += [(text, form.encode()) for form in forms]
    return pairs


def expected_layout(sent):
    """Where each sent sample must be (EDF+ as biofeed writes it): records of one second from
    the first sample, the header's start being that sample's second; seconds without a sample
    are left out (EDF+D)."""
    rate = sent["rate"]
    t = np.array(sent["t_us"], dtype=np.int64)
    start = (t[0] // 1_000_000) * 1_000_000
    slots = ((t - t[0]) * rate + 500_000) // 1_000_000
    records = sorted(set((slots // rate).tolist()))
    continuous = records == list(range(records[0], records[-1] + 1))
    return start, slots, records, continuous


def check_edf(path, sent):
    raw = open(path, "rb").read()
    for text, form in absent_forms(sent):
        if form in raw:
            fail(f"the file holds {form.decode()!r} ({text!r})")
    kind = raw[192:197].decode()
    start, slots, records, continuous = expected_layout(sent)
    if kind != ("EDF+C" if continuous else "EDF+D"):
        fail(f"file says {kind}, the samples are {'continuous' if continuous else 'discontinuous'}")
    step = (sent["max"] - sent["min"]) / 65535
    values = np.array(sent["values"], dtype=np.float32)
    rate = sent["rate"]
    if continuous:
        check_edf_c(path, sent, start, slots, records, values, step)
    else:
        check_edf_d(path, sent, start, slots, values, step)
    print(f"edf ok: {kind}, {len(records)} records, {len(sent['labels'])} signals")


def check_edf_c(path, sent, start, slots, records, values, step):
    import pyedflib  # EDFlib's reader: refuses malformed records, annotations or EDF+D

    rate = sent["rate"]
    reader = pyedflib.EdfReader(path)
    labels = reader.getSignalLabels()
    want = [f"{sent['kind']} {label}" for label in sent["labels"]]
    if labels != want:
        fail(f"labels {labels} != {want}")
    for i in range(len(labels)):
        if reader.getSampleFrequency(i) != rate:
            fail(f"signal {i}: {reader.getSampleFrequency(i)} Hz, sent {rate}")
        if reader.getPhysicalDimension(i) != sent["dimension"]:
            fail(f"signal {i}: dimension {reader.getPhysicalDimension(i)!r}")
    if reader.getPatientCode() != sent["patient_code"]:
        fail(f"patient code {reader.getPatientCode()!r}")
    if reader.getPatientName() not in ("X", ""):
        fail(f"patient name {reader.getPatientName()!r}")
    index = slots - records[0] * rate
    for i in range(len(labels)):
        read = reader.readSignal(i)
        if len(read) != len(records) * rate:
            fail(f"signal {i}: {len(read)} samples, expected {len(records) * rate}")
        error = np.abs(read[index] - values[:, i])
        if error.max() > step * 0.5 + 1e-9:
            fail(f"signal {i}: off by {error.max()} (> half a step {step / 2})")
    onsets, _, texts = reader.readAnnotations()
    for text in sent["annotations"]:
        if text not in list(texts):
            fail(f"annotation {text!r} missing from {list(texts)}")
    starts = [o for o, x in zip(onsets, texts) if x == "session start"]
    # EDFlib gives onsets from the first record's start (the header's second plus the first
    # record's time-keeping fraction), i.e. from the first sample.
    expected_start = (sent["started_us"] - sent["t_us"][0]) / 1e6
    if not starts or abs(starts[0] - expected_start) > 1e-6:
        fail(f"session start at {starts}, expected {expected_start}")
    start_time = reader.getStartdatetime().replace(tzinfo=datetime.timezone.utc)
    if int(start_time.timestamp()) * 1_000_000 != start:
        fail(f"start {start_time} != {start}")
    reader.close()


def check_edf_d(path, sent, start, slots, values, step):
    # EDFlib, edfio and MNE refuse or flatten EDF+D; Luna reads its records' own start times.
    import lunapi

    rate = sent["rate"]
    instance = lunapi.proj().inst("export")
    instance.attach_edf(path)
    headers = instance.headers()
    labels = sorted(headers["CH"].tolist())
    want = sorted(f"{sent['kind']}_{label}" for label in sent["labels"])
    if labels != want:
        fail(f"labels {labels} != {want}")
    if set(headers["SR"].tolist()) != {float(rate)} or set(headers["PDIM"].tolist()) != {sent["dimension"]}:
        fail(f"rates {set(headers['SR'])}, dimensions {set(headers['PDIM'])}")
    for i, label in enumerate(sent["labels"]):
        _, data = instance.data([f"{sent['kind']}_{label}"], [], time=True)
        # Time (seconds from the header's start, gaps included; the first record starts at the
        # first sample, a fraction of a second in) → value.
        offset = (sent["t_us"][0] - start) / 1e6
        read = {round((t - offset) * rate): v for t, v in data}
        for slot, value in zip(slots.tolist(), values[:, i]):
            if slot not in read:
                fail(f"{label}: no sample at {slot / rate} s")
            if abs(read[slot] - value) > step * 0.5 + 1e-9:
                fail(f"{label}: {read[slot]} at {slot / rate} s, sent {value}")
        if len(read) != len(set((slots // rate).tolist())) * rate:
            fail(f"{label}: {len(read)} samples in the file")


def check_csv(path, sent):
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    header = ["time", "time_us"] + [f"{label} ({sent['unit']})" for label in sent["labels"]]
    if rows[0] != header:
        fail(f"header {rows[0]} != {header}")
    body = rows[1:]
    if len(body) != len(sent["t_us"]):
        fail(f"{len(body)} rows, sent {len(sent['t_us'])}")
    for row, t_us, values in zip(body, sent["t_us"], sent["values"]):
        if int(row[1]) != t_us:
            fail(f"time_us {row[1]} != {t_us}")
        when = datetime.datetime.strptime(row[0], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
            tzinfo=datetime.timezone.utc
        )
        epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
        if (when - epoch) // datetime.timedelta(microseconds=1) != t_us:
            fail(f"time {row[0]} != {t_us}")
        read = np.array([float(v) for v in row[2:]], dtype=np.float32)
        if not np.array_equal(read, np.array(values, dtype=np.float32)):
            fail(f"values {row[2:]} != {values}")
    print(f"csv ok: {len(body)} rows")


def check_rr(path, sent):
    lines = open(path, encoding="utf-8").read().splitlines()
    read = np.array([float(line) for line in lines], dtype=np.float32)
    want = np.array([v[0] for v in sent["values"]], dtype=np.float32)
    if not np.array_equal(read, want):
        fail(f"{len(read)} intervals read, {len(want)} sent, or values differ")
    print(f"rr ok: {len(read)} intervals")


def check_bids(root, sent):
    """A BIDS-EEG dataset unpacked in `root`: every path valid by the BIDS validator's rules,
    the required files and columns, and each recording readable by EDFlib."""
    import os

    import pyedflib
    from bids_validator import BIDSValidator

    validator = BIDSValidator()
    files = []
    for folder, _, names in os.walk(root):
        for name in names:
            path = "/" + os.path.relpath(os.path.join(folder, name), root)
            files.append(path)
            if not validator.is_bids(path):
                fail(f"{path} is not a valid BIDS path")
            raw = open(os.path.join(folder, name), "rb").read()
            for text, form in absent_forms(sent):
                if form in raw:
                    fail(f"{path} holds {form.decode()!r} ({text!r})")
    description = json.load(open(os.path.join(root, "dataset_description.json")))
    for key in ("Name", "BIDSVersion"):
        if key not in description:
            fail(f"dataset_description.json has no {key}")
    with open(os.path.join(root, "participants.tsv"), encoding="utf-8") as f:
        participants = list(csv.DictReader(f, delimiter="\t"))
    ids = sorted(p["participant_id"] for p in participants)
    if ids != sorted(f"sub-{label}" for label in sent["sessions"]):
        fail(f"participants {ids}")
    for label, count in sent["sessions"].items():
        recordings = sorted(p for p in files if p.startswith(f"/sub-{label}/") and p.endswith("_eeg.edf"))
        if len(recordings) != count:
            fail(f"sub-{label}: {len(recordings)} recordings, expected {count}")
        for edf in recordings:
            stem = os.path.join(root, edf[1:-len("_eeg.edf")])
            if f"_task-{sent['task']}_" not in edf:
                fail(f"{edf}: task")
            sidecar = json.load(open(stem + "_eeg.json"))
            for key in ("TaskName", "SamplingFrequency", "EEGReference", "PowerLineFrequency", "SoftwareFilters"):
                if key not in sidecar:
                    fail(f"{edf}: sidecar lacks {key}")
            if sidecar["SamplingFrequency"] != sent["rate"] or sidecar["TaskName"] != sent["task"]:
                fail(f"{edf}: sidecar {sidecar}")
            with open(stem + "_channels.tsv", encoding="utf-8") as f:
                channels = list(csv.DictReader(f, delimiter="\t"))
            if [c["name"] for c in channels] != sent["labels"] or {c["type"] for c in channels} != {"EEG"}:
                fail(f"{edf}: channels {channels}")
            with open(stem + "_events.tsv", encoding="utf-8") as f:
                events = list(csv.DictReader(f, delimiter="\t"))
            if not events or set(events[0]) < {"onset", "duration"}:
                fail(f"{edf}: events {events}")
            reader = pyedflib.EdfReader(os.path.join(root, edf[1:]))
            if reader.getSignalLabels() != [f"EEG {label}" for label in sent["labels"]]:
                fail(f"{edf}: labels {reader.getSignalLabels()}")
            if reader.getPatientCode() != label:
                fail(f"{edf}: patient code {reader.getPatientCode()}")
            if reader.getNSamples()[0] != sent["samples_per_recording"]:
                fail(f"{edf}: {reader.getNSamples()[0]} samples")
            reader.close()
    print(f"bids ok: {len(files)} files, {len(ids)} participants")


if __name__ == "__main__":
    kind, path, sent_path = sys.argv[1:4]
    sent = json.load(open(sent_path, encoding="utf-8"))
    {"edf": check_edf, "csv": check_csv, "rr": check_rr, "bids": check_bids}[kind](path, sent)
