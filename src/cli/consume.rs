//! `biofeed consume` and `biofeed replay`.

use clap::Args;

use biofeed_backends::shutdown::Shutdown;
use biofeed_ingest_gateway::metrics_endpoint::MetricsEndpoint;
use prometheus_client::registry::Registry;

use crate::cli::progress_bar;

/// Arguments of `biofeed consume`.
#[derive(Debug, Args)]
pub struct ConsumeArgs {
    /// Address of the consumer's Prometheus endpoint (/metrics).
    #[arg(
        long,
        value_name = "ADDR",
        env = "BIOFEED_CONSUMER_METRICS_LISTEN",
        default_value = "127.0.0.1:9464"
    )]
    pub metrics_listen: std::net::SocketAddr,
    /// The consumer's settings.
    #[command(flatten)]
    pub settings: biofeed_consumers::ConsumeSettings,
}

pub(crate) async fn run(args: ConsumeArgs) -> anyhow::Result<()> {
    let shutdown = Shutdown::on_signal();
    let endpoint = MetricsEndpoint::bind(args.metrics_listen).await?;
    let mut registry = Registry::default();
    let consumer = biofeed_consumers::prepare(args.settings, &mut registry).await?;
    let metrics = endpoint.serve(registry);
    let outcome = consumer.run(shutdown).await;
    metrics.stop().await;
    let summary = outcome?;
    eprintln!(
        "stopped: {} rows written, {} frames dead-lettered, {} frames of erased users and {} of closed sessions dropped",
        summary.rows, summary.dead_lettered, summary.dropped_erased, summary.dropped_closed
    );
    Ok(())
}

pub(crate) async fn run_replay(settings: biofeed_consumers::ReplaySettings) -> anyhow::Result<()> {
    let bar = progress_bar("replay", "messages");
    let progress = bar.clone();
    let summary = biofeed_consumers::replay(settings, move |done, total| {
        progress.set_length(total);
        progress.set_position(done);
    })
    .await?;
    bar.finish_and_clear();
    eprintln!(
        "replayed {} messages: {} frames and {} points written, {} skipped (still failing the checks), {} frames of erased users and {} of closed sessions dropped",
        summary.messages, summary.frames, summary.points, summary.skipped, summary.dropped_erased, summary.dropped_closed
    );
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}
