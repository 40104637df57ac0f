//! `biofeed live`: a live member on its own.

use clap::Args;

use biofeed_backends::shutdown::Shutdown;
use biofeed_ingest_gateway::metrics_endpoint::MetricsEndpoint;
use prometheus_client::registry::Registry;

/// Arguments of `biofeed live`.
#[derive(Debug, Args)]
pub struct LiveArgs {
    /// Address of the live member's Prometheus endpoint (/metrics).
    #[arg(
        long,
        value_name = "ADDR",
        env = "BIOFEED_LIVE_METRICS_LISTEN",
        default_value = "127.0.0.1:9466"
    )]
    pub metrics_listen: std::net::SocketAddr,
    /// The member's settings.
    #[command(flatten)]
    pub settings: biofeed_live::LiveSettings,
}

pub(crate) async fn run(args: LiveArgs) -> anyhow::Result<()> {
    let shutdown = Shutdown::on_signal();
    let endpoint = MetricsEndpoint::bind(args.metrics_listen).await?;
    let mut registry = Registry::default();
    let member = biofeed_live::member::prepare(args.settings, &mut registry, "live").await?;
    let metrics = endpoint.serve(registry);
    eprintln!("biofeed live: feeding back open sessions' metrics");
    let outcome = member.run(shutdown).await;
    metrics.stop().await;
    Ok(outcome?)
}
