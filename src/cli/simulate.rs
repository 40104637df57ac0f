//! `biofeed simulate`: synthetic devices through the HTTP API, with progress.

pub(crate) async fn run(settings: biofeed_simulator::SimulateSettings) -> anyhow::Result<()> {
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    let progress = Arc::new(biofeed_simulator::Progress::default());
    let bar = indicatif::ProgressBar::new(settings.duration.as_secs().max(1));
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} simulate [{bar:30}] {elapsed}/{len}s  {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let ticker = {
        let (bar, progress) = (bar.clone(), Arc::clone(&progress));
        let devices = settings.devices;
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                for line in progress.take_live() {
                    bar.suspend(|| eprintln!("{line}"));
                }
                let elapsed = started.elapsed().as_secs_f64();
                let points = progress.points.load(Ordering::Relaxed);
                bar.set_position(elapsed as u64);
                bar.set_message(format!(
                    "{}/{devices} devices ready, {} sessions done, {points} points ({:.0}/s)",
                    progress.ready.load(Ordering::Relaxed),
                    progress.sessions.load(Ordering::Relaxed),
                    points as f64 / elapsed.max(1e-3)
                ));
            }
        })
    };
    let outcome = biofeed_simulator::simulate(&settings, Arc::clone(&progress)).await;
    ticker.abort();
    bar.finish_and_clear();
    for line in progress.take_live() {
        eprintln!("{line}");
    }
    let summary = outcome?;
    eprintln!(
        "simulated {} devices for {:.1} s: {} sessions completed, {} aborted; {} points accepted \
         ({:.0} points/s, {} of them in completed sessions); request latency p50 {:.1} ms, p99 {:.1} ms; \
         {} frames refused, {} retried",
        summary.devices,
        summary.elapsed_s,
        summary.completed,
        summary.aborted,
        summary.points_accepted,
        summary.points_per_s,
        summary.points_completed,
        summary.latency_p50_ms,
        summary.latency_p99_ms,
        summary.frames_refused,
        summary.frames_retried
    );
    println!("{}", serde_json::to_string(&summary)?);
    anyhow::ensure!(
        summary.frames_refused == 0,
        "the gateway refused {} frames (see the warnings above)",
        summary.frames_refused
    );
    Ok(())
}
