"""ClickHouse migrations also run on a current ClickHouse release.

The local server is Debian's ClickHouse 18.16; production and the Docker path run current
releases. chdb embeds a current ClickHouse engine in-process, so this test applies every file of
migrations/clickhouse there, in order, and checks the tables behave as the design says: a
replayed row collapses into the original, and analysts see completed sessions only.
"""

import pathlib
import re

import chdb
from chdb import session as chs

MIGRATIONS = pathlib.Path(__file__).resolve().parents[2] / "migrations" / "clickhouse"


def statements(sql: str) -> list[str]:
    """Split a migration file as the Rust runner does: drop `--` comments, split at `;`."""
    without_comments = "\n".join(re.sub(r"--.*$", "", line) for line in sql.splitlines())
    return [s.strip() for s in without_comments.split(";") if s.strip()]


def migration_files() -> list[pathlib.Path]:
    files = sorted(MIGRATIONS.glob("*.sql"), key=lambda p: int(p.name.split("_", 1)[0]))
    assert files, f"no migrations in {MIGRATIONS}"
    return files


def test_every_migration_runs_on_a_current_clickhouse(tmp_path):
    version = chdb.query("SELECT version()", "CSV").bytes().decode().strip().strip('"')
    assert int(version.split(".")[0]) >= 24, version

    db = chs.Session(str(tmp_path / "chdb"))
    db.query("CREATE DATABASE IF NOT EXISTS biofeed")
    has_cluster = int(
        db.query(
            "SELECT count() FROM system.clusters WHERE cluster = 'biofeed_analyst_source'", "CSV"
        ).bytes().decode().strip()
    ) > 0
    for path in migration_files():
        text = path.read_text()
        if "{analyst_database}" in text and not has_cluster:
            # As the runner does: the analyst database's Distributed tables need the cluster;
            # without it (here, and on managed services) analysts get SQL grants instead.
            continue
        text = text.replace("{database}", "biofeed").replace("{analyst_database}", "biofeed_analyst")
        for statement in statements(text):
            db.query(f"USE biofeed; {statement}")
        # Applying a file twice is harmless (the runner may be interrupted half-way).
        for statement in statements(text):
            db.query(f"USE biofeed; {statement}")

    tables = db.query(
        "SELECT name FROM system.tables WHERE database = 'biofeed' ORDER BY name", "CSV"
    ).bytes().decode().split()
    assert tables == [
        '"analyst_points"', '"completed_sessions"', '"points"', '"rollups_1m"', '"rollups_1s"',
        '"session_facts"', '"session_metrics"',
    ]

    row = (
        "('00000000-0000-0000-0000-000000000001', '00000000-0000-0000-0000-0000000000aa',"
        " 'rr_interval', {t}, [812.5], now())"
    )
    frame = ", ".join(row.format(t=t) for t in (1_000_000, 1_812_500, 2_600_000))
    insert = f"INSERT INTO biofeed.points (user_id, session_id, data_type, t_us, values, ingested_at) VALUES {frame}"
    db.query(insert)
    db.query(insert)  # the same frame again, as a replay writes it

    def count(sql: str) -> int:
        return int(db.query(sql, "CSV").bytes().decode().strip())

    assert count("SELECT count() FROM biofeed.points FINAL") == 3
    assert count("SELECT count() FROM biofeed.analyst_points") == 0
    db.query(
        "INSERT INTO biofeed.session_facts VALUES ('00000000-0000-0000-0000-0000000000aa',"
        " '00000000-0000-0000-0000-000000000001', 'hrv_biofeedback', 'completed', now(), now(), 1)"
    )
    assert count("SELECT count() FROM biofeed.analyst_points") == 3
    assert count("SELECT count() FROM biofeed.completed_sessions") == 1

    # The rollups job's statement shape (jobs/src/jobs.rs) runs here too, and a replayed frame
    # counts once: 3 samples in 2 one-second buckets.
    for version in (1, 2):
        db.query(
            "INSERT INTO biofeed.rollups_1s (user_id, session_id, data_type, channel, bucket_us, count, min, max, sum, mean, version)"
            " SELECT user_id, session_id, data_type, toUInt16(channel - 1), intDiv(t_us, 1000000) * 1000000 AS bucket,"
            f" count(), min(v), max(v), sum(toFloat64(v)), avg(toFloat64(v)), toUInt64({version})"
            " FROM (SELECT user_id, session_id, data_type, t_us, values FROM biofeed.points FINAL)"
            " ARRAY JOIN values AS v, arrayEnumerate(values) AS channel"
            " GROUP BY user_id, session_id, data_type, channel, bucket"
        )
    assert count("SELECT count() FROM biofeed.rollups_1s FINAL") == 2
    assert count("SELECT sum(count) FROM biofeed.rollups_1s FINAL") == 3


CLUSTER_MIGRATIONS = MIGRATIONS.parent / "clickhouse-cluster"

# One node of a one-shard cluster named `biofeed`, as clickhouse-local (chdb) can be: a
# Distributed table over it runs locally, without a network.
CHDB_CLUSTER_CONFIG = """<clickhouse>
  <tcp_port>9000</tcp_port>
  <remote_servers>
    <biofeed><shard><replica><host>localhost</host><port>9000</port></replica></shard></biofeed>
  </remote_servers>
</clickhouse>
"""


def test_the_cluster_migrations_parse_and_behave_on_a_current_clickhouse(tmp_path):
    """The files of migrations/clickhouse-cluster, as a current server would take them.

    Every statement, verbatim (ON CLUSTER, Replicated engines with their ZooKeeper paths and
    macros, Distributed engines with the sharding key), must parse (EXPLAIN AST). chdb runs no
    ZooKeeper/Keeper and no DDL queue, so to run them it drops `ON CLUSTER` and the Replicated
    engines' path and replica arguments — what is left is the engine each replica runs — and
    keeps the Distributed tables over a one-node cluster. Then the same behaviour as a single
    server's: a replayed row collapses through the Distributed table with FINAL, and analysts
    see completed sessions only.
    """
    config = tmp_path / "config.xml"
    config.write_text(CHDB_CLUSTER_CONFIG)
    conn = chdb.connect(f"file:{tmp_path / 'chdb'}?config-file={config}")
    cur = conn.cursor()

    def run(sql: str) -> list:
        cur.execute(sql)
        return list(cur.fetchall())

    assert run("SELECT count() FROM system.clusters WHERE cluster = 'biofeed'") == [(1,)]
    files = sorted(CLUSTER_MIGRATIONS.glob("*.sql"), key=lambda p: int(p.name.split("_", 1)[0]))
    assert [p.name for p in files] == [p.name for p in migration_files()]
    run("CREATE DATABASE IF NOT EXISTS biofeed")
    replicated = re.compile(r"Replicated(\w*MergeTree)\('[^']*',\s*'[^']*'(?:,\s*)?")
    for path in files:
        text = (
            path.read_text()
            .replace("{database}", "biofeed")
            .replace("{analyst_database}", "biofeed_analyst")
            .replace("{cluster}", "biofeed")
        )
        for statement in statements(text):
            assert "ON CLUSTER biofeed" in statement, statement
            run(f"EXPLAIN AST {statement}")
            if "biofeed_analyst" in statement:
                continue  # needs the analyst source cluster, as in the single-server test
            local = replicated.sub(r"\1(", statement.replace(" ON CLUSTER biofeed", ""))
            run(local)

    tables = [r[0] for r in run("SELECT name FROM system.tables WHERE database = 'biofeed' ORDER BY name")]
    assert tables == [
        "analyst_points", "completed_sessions", "points", "points_local", "rollups_1m",
        "rollups_1m_local", "rollups_1s", "rollups_1s_local", "session_facts", "session_metrics",
        "session_metrics_local",
    ]
    engines = dict(run("SELECT name, engine FROM system.tables WHERE database = 'biofeed'"))
    assert engines["points"] == "Distributed" and engines["points_local"] == "ReplacingMergeTree"

    row = (
        "('00000000-0000-0000-0000-000000000001', '00000000-0000-0000-0000-0000000000aa',"
        " 'rr_interval', {t}, [812.5], now())"
    )
    frame = ", ".join(row.format(t=t) for t in (1_000_000, 1_812_500, 2_600_000))
    insert = (
        "INSERT INTO biofeed.points (user_id, session_id, data_type, t_us, values, ingested_at)"
        f" SETTINGS insert_distributed_sync = 1 VALUES {frame}"
    )
    run(insert)
    run(insert)  # a replay
    assert run("SELECT count() FROM biofeed.points FINAL") == [(3,)]
    assert run("SELECT count() FROM biofeed.points_local") == [(6,)]
    assert run("SELECT count() FROM biofeed.analyst_points") == [(0,)]
    run(
        "INSERT INTO biofeed.session_facts VALUES ('00000000-0000-0000-0000-0000000000aa',"
        " '00000000-0000-0000-0000-000000000001', 'hrv_biofeedback', 'completed', now(), now(), 1)"
    )
    assert run("SELECT count() FROM biofeed.analyst_points") == [(3,)]
    # The sharding key is the same function of the person here as on 18.16 (where the cluster
    # tests run), so that rows keep their shard across an upgrade.
    assert run(
        "SELECT cityHash64(toString(toUUID('00000000-0000-0000-0000-000000000001')))"
    ) == [(int(SHARD_HASH_OF_USER_1),)]


# cityHash64(toString(toUUID('00000000-0000-0000-0000-000000000001'))) as ClickHouse 18.16
# computes it (clickhouse-client against compose/local's server).
SHARD_HASH_OF_USER_1 = "14327512838999986089"
