//! `biofeed bench …`: the benchmarks, each printing its figures as last-line JSON.

use clap::Subcommand;

use crate::cli::AFTER_HELP;

/// `biofeed bench …`.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Points per second through the gateway (JSON and Avro, 1 and 8 channels) against
    /// producing the same frames straight into Kafka; request latency p50/p99.
    ///
    /// Needs the PII keys; makes a Postgres database (migrated, holding the bench user) and a
    /// topic of its own, and drops them afterwards: nothing lands in the configured database.
    #[command(after_help = AFTER_HELP)]
    Gateway(Box<biofeed_bench::gateway::BenchGatewaySettings>),

    /// Points per second one consumer drains from Kafka into ClickHouse, against ClickHouse's
    /// own Kafka table engine with a materialized view on the same points; bytes per point on
    /// disk. Makes and afterwards drops Postgres and ClickHouse databases and topics of its own.
    #[command(after_help = AFTER_HELP)]
    Consume(Box<biofeed_bench::consume::BenchConsumeSettings>),

    /// The whole pipeline under sustained load: many simulated devices post through HTTP to a
    /// `biofeed up` of its own (own Postgres and ClickHouse databases and topics, dropped
    /// afterwards: nothing lands in the configured ones) for a fixed time; reports
    /// points/s offered vs stored, end-to-end latency (device send → queryable in ClickHouse)
    /// p50/p99, gateway p99, peak RSS, bytes per point on disk; then runs `bench gateway` and
    /// `bench consume` as the peer comparisons; writes a markdown report (docs/bench-e2e.md).
    ///
    /// Needs the PII keys. Exit code 1 if a point was lost (with `--find-ceiling`: in any probe).
    #[command(after_help = AFTER_HELP)]
    E2e(Box<biofeed_bench::e2e::BenchE2eSettings>),

    /// How fast long sessions export, and in how much memory: stores a synthetic EEG session
    /// of each length (8 channels at 256 Hz; by default 10 minutes and one hour, 7.4 M samples)
    /// in databases of its own, runs `biofeed admin session export` on each in each format,
    /// and reports MB/s and the export's peak RSS beside this disk's sequential write speed.
    ///
    /// Needs the PII keys. Makes and afterwards drops Postgres and ClickHouse databases and
    /// topics of its own.
    #[command(after_help = AFTER_HELP)]
    Export(Box<biofeed_bench::export::BenchExportSettings>),
}

pub(crate) async fn run_export(
    settings: biofeed_bench::export::BenchExportSettings,
) -> anyhow::Result<()> {
    let figures =
        biofeed_bench::export::run(&settings, |step| eprintln!("bench export: {step}")).await?;
    for r in &figures.runs {
        eprintln!(
            "{}: {} s session, {} samples → {} bytes in {:.2} s ({:.2} s CPU): {:.1} MB/s, {:.2} M samples/s, peak RSS {:.0} MiB",
            r.format,
            r.session_seconds,
            r.samples,
            r.bytes,
            r.seconds,
            r.cpu_seconds,
            r.mb_per_s,
            r.samples_per_s / 1e6,
            r.peak_rss_mib
        );
    }
    eprintln!(
        "this disk writes {:.0} MB/s sequentially (fsync'd)",
        figures.disk_mb_per_s
    );
    println!("{}", serde_json::to_string(&figures)?);
    Ok(())
}

pub(crate) async fn run_e2e(settings: biofeed_bench::e2e::BenchE2eSettings) -> anyhow::Result<()> {
    let figures = biofeed_bench::e2e::run(&settings, |step| eprintln!("bench e2e: {step}")).await?;
    eprintln!(
        "end to end: {:.0} points/s offered, {:.0} stored (ratio {:.3}); latency device → queryable p50 {:.0} ms, p99 {:.0} ms; \
         gateway p99 {:.1} ms; peak RSS {:.0} MiB; {:.2} bytes/point; {} accepted, {} stored; report in {}",
        figures.offered_points_per_s,
        figures.stored_points_per_s,
        figures.ratio,
        figures.e2e_p50_ms,
        figures.e2e_p99_ms,
        figures.gateway_p99_ms,
        figures.peak_rss_mib,
        figures.bytes_per_point,
        figures.accepted,
        figures.stored,
        settings.report.display()
    );
    if settings.find_ceiling {
        match figures.ceiling_points_per_s {
            Some(c) => eprintln!(
                "ceiling: {}{c:.0} points/s offered sustained (stored/offered ≥ 0.99, p99 < 1 s, nothing lost) over {} probes",
                if figures.ceiling_at_device_cap {
                    "at least "
                } else {
                    ""
                },
                figures.probes.len()
            ),
            None => eprintln!(
                "ceiling: none of {} probes was sustained (stored/offered ≥ 0.99, p99 < 1 s, nothing lost)",
                figures.probes.len()
            ),
        }
    }
    if figures.live_sessions > 0 {
        eprintln!(
            "live feedback: {} sessions watched, sample → feedback p50 {:.0} ms, p99 {:.0} ms; {} windows in {} bytes ({:.0} B each); {} viewers lost",
            figures.live_sessions,
            figures.live_p50_ms,
            figures.live_p99_ms,
            figures.live_windows,
            figures.live_window_bytes,
            figures.live_window_bytes as f64 / figures.live_windows.max(1) as f64,
            figures.live_viewers_lost
        );
    }
    println!("{}", serde_json::to_string(&figures)?);
    // A search's probes each ran on stores of their own: a point lost in any of them counts.
    let lost = if settings.find_ceiling {
        figures
            .probes
            .iter()
            .filter_map(|p| p.lost)
            .map(|l| l.max(0))
            .sum()
    } else {
        figures.lost
    };
    anyhow::ensure!(lost == 0, "{lost} accepted points never became queryable");
    Ok(())
}
