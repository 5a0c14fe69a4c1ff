use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    shared::telemetry::init_tracing();
    let config = ingest::config::Config::parse();
    match ingest::run(config, shared::telemetry::shutdown_signal()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ingest: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
