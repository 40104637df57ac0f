//! `biofeed up`: the gateway, a consumer, a jobs runner and a live member in one process.

use biofeed_ingest_gateway::GatewaySettings;
use clap::Args;

use biofeed_backends::shutdown::{run_parts, Part, Shutdown};
use biofeed_consumers::ConsumeSettings;
use biofeed_ingest_gateway::metrics_endpoint::MetricsEndpoint;
use biofeed_ingest_gateway::Application;
use biofeed_jobs::metrics::JobMetrics;
use biofeed_jobs::JobsSettings;
use prometheus_client::registry::Registry;

/// Arguments of `biofeed up`.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// Address of the Prometheus endpoint of the consumer and the jobs runner (the gateway
    /// serves its own at /metrics).
    #[arg(
        long = "metrics-listen",
        id = "up_metrics_listen",
        value_name = "ADDR",
        env = "BIOFEED_UP_METRICS_LISTEN",
        default_value = "127.0.0.1:9464"
    )]
    pub metrics_listen: std::net::SocketAddr,
    /// The gateway's settings, and where every service is.
    #[command(flatten)]
    pub gateway: Box<GatewaySettings>,
    /// The consumer's settings.
    #[command(flatten, next_help_heading = "Consumer")]
    pub consumer: biofeed_consumers::ConsumerOptions,
    /// The jobs runner's settings.
    #[command(flatten, next_help_heading = "Jobs")]
    pub jobs: biofeed_jobs::JobsOptions,
    /// Run a live member in this process (the live feedback of GET /v1/sessions/{id}/live);
    /// `false` where live members run apart (`biofeed live`).
    #[arg(long = "live-member", id = "up_live_member", value_name = "BOOL", env = "BIOFEED_UP_LIVE_MEMBER", default_value_t = true, action = clap::ArgAction::Set)]
    pub live_member: bool,
    /// The live member's settings.
    #[command(flatten, next_help_heading = "Live feedback")]
    pub live: biofeed_live::LiveOptions,
}

pub(crate) async fn run(args: UpArgs) -> anyhow::Result<()> {
    let shutdown = Shutdown::on_signal();
    let gateway = *args.gateway;
    let stores = gateway.stores();
    let jobs = JobsSettings::beside(args.jobs, &stores, &args.consumer.group);
    let endpoint = MetricsEndpoint::bind(args.metrics_listen).await?;
    let mut registry = Registry::default();
    let consumer = biofeed_consumers::prepare(
        ConsumeSettings {
            options: args.consumer,
            stores,
        },
        &mut registry,
    )
    .await?;
    let job_metrics = JobMetrics::registered(&mut registry);
    let live = if args.live_member {
        Some(
            biofeed_live::member::prepare(
                biofeed_live::LiveSettings {
                    options: args.live,
                    postgres: gateway.postgres.clone(),
                    kafka: gateway.kafka.clone(),
                    topics: gateway.topics.clone(),
                    registry: gateway.registry.clone(),
                },
                &mut registry,
                "up",
            )
            .await?,
        )
    } else {
        None
    };
    let app = Application::build(gateway).await?;
    eprintln!(
        "biofeed up: gateway on {}://{}, consumer, jobs and live metrics on http://{}/metrics",
        app.scheme(),
        app.local_addr()?,
        endpoint.address()?
    );
    let metrics = endpoint.serve(registry);
    let mut parts = vec![
        Part::new("gateway", app.run_until(shutdown.wait())),
        Part::new("consumer", consume(consumer, shutdown.clone())),
        Part::new(
            "jobs",
            biofeed_jobs::run_runner(jobs, job_metrics, shutdown.clone()),
        ),
    ];
    if let Some(live) = live {
        parts.push(Part::new("live", live_part(live, shutdown.clone())));
    }
    let outcome = run_parts(&shutdown, parts).await;
    metrics.stop().await;
    Ok(outcome?)
}

/// The consumer's part: runs, then says what it did.
async fn consume(
    consumer: biofeed_consumers::PreparedConsumer,
    shutdown: Shutdown,
) -> Result<(), biofeed_consumers::ConsumeError> {
    let summary = consumer.run(shutdown).await?;
    eprintln!(
        "consumer stopped: {} rows written, {} frames dead-lettered, {} frames of erased users and {} of closed sessions dropped",
        summary.rows, summary.dead_lettered, summary.dropped_erased, summary.dropped_closed
    );
    Ok(())
}

/// The live member's part: its failure (e.g. another member took its instance id) is logged and
/// leaves the gateway, the consumer and the jobs running; the feeds stop until a restart.
async fn live_part(
    live: biofeed_live::member::PreparedMember,
    shutdown: Shutdown,
) -> Result<(), biofeed_live::LiveError> {
    if let Err(e) = live.run(shutdown.clone()).await {
        tracing::error!(error = %e, "the live member stopped: no live feedback until biofeed up restarts");
        shutdown.wait().await;
    }
    Ok(())
}
