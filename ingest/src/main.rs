// glibc malloc showed up as ~9% of ingest CPU under load (perf); mimalloc is faster for
// the many small per-request allocations and keeps fragmentation low.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    shared::telemetry::init_tracing();
    let config: ingest::config::Config = shared::cli::parse();
    match ingest::run(config, shared::telemetry::shutdown_signal()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ingest: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
