//! The markdown report of `biofeed bench e2e`: the figures against their targets, the peers',
//! the machine it ran on and the settings that shaped it.

use anyhow::Context as _;

use super::{BenchE2eSettings, E2eFigures};

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cores} cores ({cpu}), {memory:.0} GiB memory, Linux {}",
        kernel.trim()
    )
}

/// The settings of the `biofeed up` child that shape these figures, as it saw them: each as
/// `NAME=value`, and whether it was set (differs from the default).
fn tuning() -> Vec<(String, bool)> {
    [
        ("BIOFEED_CLICKHOUSE_COMPRESSION", "lz4"),
        ("BIOFEED_GATEWAY_AUTH_CACHE_TTL", "2s"),
        ("BIOFEED_GATEWAY_SESSION_CACHE_TTL", "2s"),
        ("BIOFEED_BATCH_MAX_AGE", "500ms"),
        ("BIOFEED_BATCH_MAX_ROWS", "500000"),
        ("BIOFEED_INSERTS_IN_FLIGHT", "3"),
    ]
    .iter()
    .map(|(name, default)| match std::env::var(name) {
        Ok(value) if value != *default => (format!("{name}={value}"), true),
        _ => (format!("{name}={default}"), false),
    })
    .collect()
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "**not met**"
    }
}

/// The live-feedback rows (`--live-sessions`), or nothing.
fn live_rows(f: &E2eFigures) -> String {
    if f.live_sessions == 0 {
        return String::new();
    }
    format!(
        "| live sessions watched (RR, one viewer each) | {} ({} feeds received, {} viewers lost, {} frames unanswered after 5 s) | |\n\
         | sample-to-feedback latency p50 / p99 (device send → a feed whose window holds it) | {:.0} ms / {:.0} ms | p99 < 1 s: {} |\n\
         | live member's windows (the live sessions' and the load's) / their samples' bytes (per window) | {} / {} ({:.0} B) | |\n",
        f.live_sessions,
        f.live_feeds,
        f.live_viewers_lost,
        f.live_unanswered,
        f.live_p50_ms,
        f.live_p99_ms,
        verdict(f.live_p99_ms < 1_000.0 && f.live_p99_ms > 0.0),
        f.live_windows,
        f.live_window_bytes,
        f.live_window_bytes as f64 / f.live_windows.max(1) as f64,
    )
}

/// The ceiling section (`--find-ceiling`), or nothing.
fn ceiling_section(settings: &BenchE2eSettings, f: &E2eFigures) -> String {
    if !settings.find_ceiling {
        return String::new();
    }
    let ceiling = match f.ceiling_points_per_s {
        Some(c) if f.ceiling_at_device_cap => format!(
            "**at least {c:.0} points/s offered** (held at the {} devices the bench allows; not measured above)",
            super::MAX_DEVICES
        ),
        Some(c) => format!("**{c:.0} points/s offered**"),
        None => "**none**: not even the lowest load probed was".to_owned(),
    };
    let rows: String = f
        .probes
        .iter()
        .enumerate()
        .map(|(i, p)| {
            format!(
                "| {} | {} | {:.0} | {:.0} | {:.3} | {:.0} ms (≥ {:.0} ms) | {:.1} ms | {} | {} |\n",
                i + 1,
                p.devices,
                p.offered_points_per_s,
                p.stored_points_per_s,
                p.ratio,
                p.e2e_p99_ms,
                p.e2e_p99_lower_ms,
                p.gateway_p99_ms,
                p.lost.map_or_else(|| "?".to_owned(), |l| l.to_string()),
                match &p.error {
                    Some(e) => format!("no: failed to run ({})", e.replace('|', "\\|")),
                    None if p.sustained => "yes".to_owned(),
                    None => "no".to_owned(),
                }
            )
        })
        .collect();
    format!(
        "## Ceiling\n\n\
         The highest offered load sustained for {secs:.0} s with stored/offered ≥ 0.99, \
         device-to-queryable p99 < 1 s and nothing lost: {ceiling}. Each probe ran on fresh \
         stores; the devices rose by a quarter while a load held, then the gap between the \
         highest held and the lowest not held was halved until under a tenth. The figures above \
         are the first probe's. A probe row counts as queryable when the query that found it \
         answered (an upper bound, which the 1 s test judges); in brackets the same p99 counted \
         from when the query before it was sent, which had not found it yet (a lower bound): the \
         gap is the probing's resolution under load.\n\n\
         | probe | devices | offered points/s | stored points/s | stored / offered | p99 device → queryable | gateway p99 | lost | sustained |\n\
         |---|---|---|---|---|---|---|---|---|\n{rows}\n",
        secs = settings.duration.as_secs_f64(),
    )
}

/// The bytes-per-point section: this ClickHouse as configured, and (`--chdb-python`) the same
/// rows on a current ClickHouse under each DDL compose/bench/storage-bytes tries.
fn storage_section(f: &E2eFigures) -> String {
    let Some(storage) = &f.storage else {
        return format!(
            "## Bytes per point\n\n{:.2} bytes per point on disk right after the run (its parts as \
             inserted and merged so far). The same rows on a current ClickHouse were not measured \
             (run with `--chdb-python .state/venv/bin/python`).\n\n",
            f.bytes_per_point
        );
    };
    if let Some(error) = storage["error"].as_str() {
        return format!(
            "## Bytes per point\n\n{:.2} bytes per point on disk right after the run (its parts as \
             inserted and merged so far). Measuring the same rows on a current ClickHouse failed: \
             {error}\n\n",
            f.bytes_per_point
        );
    }
    let server = storage["server_version"].as_str().unwrap_or("?");
    let current = storage["current_version"].as_str().unwrap_or("?");
    let mut rows = String::new();
    for d in storage["data_types"].as_array().into_iter().flatten() {
        let line = |v: &serde_json::Value, name: &str| {
            format!(
                "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} |\n",
                d["data_type"].as_str().unwrap_or("?"),
                name,
                number(v, "bytes_per_point"),
                number(v, "bytes_per_value"),
                number(v, "t_us_bytes_per_point"),
                number(v, "values_bytes_per_value"),
            )
        };
        rows.push_str(&line(
            &d["server"],
            d["server"]["variant"].as_str().unwrap_or(server),
        ));
        if d["server_codes"].is_object() {
            rows.push_str(&line(
                &d["server_codes"],
                d["server_codes"]["variant"].as_str().unwrap_or(server),
            ));
        }
        for v in d["current"].as_array().into_iter().flatten() {
            rows.push_str(&line(
                v,
                &format!(
                    "ClickHouse {current} (chdb): {}",
                    v["variant"].as_str().unwrap_or("?")
                ),
            ));
        }
    }
    let points: u64 = storage["data_types"]
        .as_array()
        .map_or(0, |a| a.iter().filter_map(|d| d["points"].as_u64()).sum());
    format!(
        "## Bytes per point\n\n{:.2} bytes per point on disk right after the run (its parts as \
         inserted and merged so far). Below, {points} of the run's points (40 whole sessions) \
         copied and merged into one part (`OPTIMIZE … FINAL`), measured with \
         `system.parts_columns` by `compose/bench/storage-bytes`: on this server, and on a \
         current ClickHouse (chdb, in-process) under each DDL the script gives. Lossless: the \
         same Float32 values in each.\n\n\
         | data type | stored as | bytes/point | bytes/value | `t_us` bytes/point | `values` bytes/value |\n\
         |---|---|---|---|---|---|\n{rows}\n",
        f.bytes_per_point
    )
}

/// A figure of a peer benchmark's last-line JSON (NaN when it is missing).
fn number(v: &serde_json::Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or(f64::NAN)
}

/// The peers table's row of `command`: its points/s against its peer's (the two `rates` keys of
/// its last-line JSON), their ratio and the `last` cell; "not run" without figures.
fn peer_row(
    command: &str,
    versus: &str,
    figures: Option<&serde_json::Value>,
    rates: [&str; 2],
    last: impl Fn(&serde_json::Value) -> String,
) -> String {
    match figures {
        Some(v) => format!(
            "| `{command}`: {versus} | {:.0} points/s | {:.0} points/s | {:.2} | {} |\n",
            number(v, rates[0]),
            number(v, rates[1]),
            number(v, "ratio"),
            last(v),
        ),
        None => format!("| `{command}` | not run | | | |\n"),
    }
}

/// Writes the markdown report of a run to `settings.report`.
pub(super) fn write_report(settings: &BenchE2eSettings, f: &E2eFigures) -> anyhow::Result<()> {
    let gateway_peer = peer_row(
        "biofeed bench gateway",
        "the gateway vs producing the same Avro frames straight into Kafka (librdkafka)",
        f.gateway_peer.as_ref(),
        ["gateway_points_per_s", "direct_points_per_s"],
        |v| format!("gateway p99 {:.1} ms", number(v, "latency_p99_ms")),
    );
    let consume_peer = peer_row(
        "biofeed bench consume",
        "one consumer vs ClickHouse's Kafka engine + materialized view",
        f.consume_peer.as_ref(),
        ["consumer_points_per_s", "kafka_engine_points_per_s"],
        |v| format!("{:.2} bytes/point on disk", number(v, "bytes_per_point")),
    );
    let report = format!(
        "# biofeed end-to-end benchmark\n\n\
         Written by `biofeed bench e2e` on {date}, on {machine}, with PostgreSQL, ClickHouse \
         and Kafka on the same machine (`{up}`).\n\n\
         Load: {devices} simulated devices, each one session streaming a single-channel signal at \
         {rate} Hz, posting Avro frames every {interval:?} through HTTP to `biofeed up` (gateway, \
         consumer and jobs in one process); {secs:.0} s measured after a 10 s warm-up. Settings that \
         matter here: {tuning}.\n\n\
         Topology: {topology}.\n\n\
         Connections: {security}.\n\n\
         | figure | value | target |\n|---|---|---|\n\
         | points/s offered | {offered:.0} | |\n\
         | points/s accepted (202) | {accepted_rate:.0} | |\n\
         | points/s stored (queryable in ClickHouse) | {stored_rate:.0} | ≥ 1,000,000: {t1} |\n\
         | stored / offered | {ratio:.3} | |\n\
         | end-to-end latency p50 / p99 (device send → queryable: found by a probe query; in brackets the p99 counted from the query before, which had not found it) | {e50:.0} ms / {e99:.0} ms (≥ {e99lo:.0} ms) | p99 < 2 s: {t2} |\n\
         | gateway request latency p50 / p99 | {g50:.1} ms / {g99:.1} ms | |\n\
         | points accepted / stored after draining | {acc} / {sto} | none lost: {t3} |\n\
         | requests retried after 429/503 | {retried} | |\n\
         | rows written beyond the distinct points (taken off the stored rate when counted) | {duplicates} | |\n\
         | peak RSS of `biofeed up` | {rss:.0} MiB | |\n\
         | bytes per point on disk (one replica's copy) | {bpp:.2} | |\n{live}\n\
         {ceiling}\
         {storage}\
         ## Peers, same run\n\n| benchmark | biofeed | peer | ratio | |\n|---|---|---|---|---|\n{gp}{cp}\n\
         Reproduce: `{up} && eval \"$(compose/local env migrate)\" && biofeed migrate && {env}{tls}biofeed bench e2e --devices {devices} --rate {rate} --duration {duration:?}{live_arg}{ca}{find}{peers}{chdb}`.\n",
        ceiling = ceiling_section(settings, f),
        storage = storage_section(f),
        find = if settings.find_ceiling { " --find-ceiling" } else { "" },
        up = if settings.stores.clickhouse.cluster.is_some() {
            "compose/local up --cluster"
        } else {
            "compose/local up"
        },
        peers = if settings.no_peers { " --no-peers" } else { "" },
        chdb = if settings.chdb_python.is_some() {
            " --chdb-python .state/venv/bin/python"
        } else {
            ""
        },
        live_arg = if settings.live_sessions > 0 {
            format!(" --live-sessions {}", settings.live_sessions)
        } else {
            String::new()
        },
        tls = if settings.gateway_ca_file.is_some() {
            "BIOFEED_GATEWAY_TLS_CERT_FILE=.state/tls/gateway.pem BIOFEED_GATEWAY_TLS_KEY_FILE=.state/tls/gateway.key "
        } else {
            ""
        },
        ca = if settings.gateway_ca_file.is_some() {
            " --gateway-ca-file .state/tls/ca.pem"
        } else {
            ""
        },
        env = tuning().iter().filter(|(_, set)| *set).map(|(s, _)| format!("{s} ")).collect::<String>(),
        duration = settings.duration,
        date = chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
        tuning = tuning().iter().map(|(s, _)| format!("`{s}`")).collect::<Vec<_>>().join(", "),
        machine = machine(),
        security = f.security,
        topology = f.topology,
        devices = f.devices,
        rate = f.rate_hz,
        interval = settings.frame_interval,
        secs = f.seconds,
        offered = f.offered_points_per_s,
        accepted_rate = f.accepted_points_per_s,
        stored_rate = f.stored_points_per_s,
        t1 = verdict(f.stored_points_per_s >= 1_000_000.0),
        ratio = f.ratio,
        e50 = f.e2e_p50_ms,
        e99 = f.e2e_p99_ms,
        e99lo = f.e2e_p99_lower_ms,
        t2 = verdict(f.e2e_p99_ms < 2_000.0 && f.e2e_p99_ms > 0.0),
        g50 = f.gateway_p50_ms,
        g99 = f.gateway_p99_ms,
        acc = f.accepted,
        sto = f.stored,
        t3 = verdict(f.lost == 0),
        retried = f.retried,
        duplicates = f.duplicates.map_or_else(|| "? (not counted)".to_owned(), |d| d.to_string()),
        rss = f.peak_rss_mib,
        bpp = f.bytes_per_point,
        gp = gateway_peer,
        cp = consume_peer,
        live = live_rows(f),
    );
    if let Some(dir) = settings
        .report
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
    {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&settings.report, report)
        .with_context(|| format!("writing the report to {}", settings.report.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::e2e::{Probe, MAX_DEVICES};
    use clap::Parser as _;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        settings: BenchE2eSettings,
    }

    fn settings(find_ceiling: bool) -> BenchE2eSettings {
        let mut args = vec![
            "bench",
            "--master-key",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            "--blind-index-key",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        ];
        if find_ceiling {
            args.push("--find-ceiling");
        }
        Cli::try_parse_from(args)
            .expect("bench e2e's defaults parse")
            .settings
    }

    fn probe(devices: u32, sustained: bool) -> Probe {
        Probe {
            devices,
            offered_points_per_s: f64::from(devices) * 1_000.0,
            stored_points_per_s: f64::from(devices) * 1_000.0,
            ratio: 1.0,
            e2e_p99_ms: 900.0,
            e2e_p99_lower_ms: 800.0,
            gateway_p99_ms: 10.0,
            lost: Some(0),
            sustained,
            error: None,
        }
    }

    #[test]
    fn a_ceiling_held_at_the_device_cap_reads_at_least() {
        let f = E2eFigures {
            ceiling_points_per_s: Some(1e8),
            ceiling_at_device_cap: true,
            probes: vec![probe(MAX_DEVICES, true)],
            ..E2eFigures::default()
        };
        let text = ceiling_section(&settings(true), &f);
        assert!(
            text.contains("**at least 100000000 points/s offered**"),
            "{text}"
        );
        let f = E2eFigures {
            ceiling_at_device_cap: false,
            ..f
        };
        assert!(!ceiling_section(&settings(true), &f).contains("at least"));
        assert_eq!(ceiling_section(&settings(false), &f), "");
    }

    #[test]
    fn a_probe_that_failed_to_run_shows_why_and_an_unknown_loss() {
        let mut failed = probe(2000, false);
        failed.lost = None;
        failed.error = Some("biofeed up did not become ready | within 60 s".to_owned());
        let f = E2eFigures {
            ceiling_points_per_s: Some(1e6),
            probes: vec![probe(1000, true), failed],
            ..E2eFigures::default()
        };
        let text = ceiling_section(&settings(true), &f);
        let row = text
            .lines()
            .find(|l| l.starts_with("| 2 |"))
            .expect("a row per probe");
        assert!(row.contains("| ? |"), "{row}");
        assert!(
            row.contains("no: failed to run (biofeed up did not become ready \\| within 60 s)"),
            "{row}"
        );
    }

    #[test]
    fn the_bytes_section_gives_each_way_of_storing_or_why_it_is_missing() {
        let mut f = E2eFigures {
            bytes_per_point: 5.75,
            ..E2eFigures::default()
        };
        assert!(storage_section(&f).contains("--chdb-python"));
        f.storage = Some(serde_json::json!({ "error": "chdb is not installed" }));
        assert!(storage_section(&f).contains("failed: chdb is not installed"));
        let figures = |variant: &str, b: f64| {
            serde_json::json!({ "variant": variant, "bytes_per_point": b, "bytes_per_value": b,
                                 "t_us_bytes_per_point": 0.5, "values_bytes_per_value": b - 0.5 })
        };
        f.storage = Some(serde_json::json!({
            "server_version": "18.16.1", "current_version": "26.9",
            "data_types": [{ "data_type": "ecg", "points": 4000, "values": 4000,
                "server": figures("ClickHouse 18.16.1: merged from 20.0 MB of parts, so LZ4", 5.7),
                "server_codes": figures("ClickHouse 18.16.1, values as Int32 integer codes: merged from 5.0 MB of parts, so LZ4", 3.6),
                "current": [figures("DoubleDelta times, ZSTD(1) values", 1.9)] }],
        }));
        let text = storage_section(&f);
        assert!(text.contains("4000 of the run's points"), "{text}");
        assert!(text.contains("| ecg | ClickHouse 18.16.1, values as Int32 integer codes: merged from 5.0 MB of parts, so LZ4 | 3.60 |"), "{text}");
        assert!(
            text.contains(
                "| ecg | ClickHouse 18.16.1: merged from 20.0 MB of parts, so LZ4 | 5.70 |"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "| ecg | ClickHouse 26.9 (chdb): DoubleDelta times, ZSTD(1) values | 1.90 |"
            ),
            "{text}"
        );
    }
}
