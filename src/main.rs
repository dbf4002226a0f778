use clap::Parser;
use std::process::ExitCode;

#[global_allocator]
static ALLOC: tokenvault_webhook::sandbox::zalloc::ZeroizingAlloc =
    tokenvault_webhook::sandbox::zalloc::ZeroizingAlloc::system();

fn main() -> ExitCode {
    // Before anything else: no core dumps, not dumpable, umask 027.
    if let Err(e) = tokenvault_webhook::sandbox::harden_process() {
        eprintln!("tokenvault-webhook: {e}");
        return ExitCode::from(1);
    }
    let cli = tokenvault_webhook::cli::Cli::parse();
    match tokenvault_webhook::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tokenvault-webhook: error: {e:#}");
            ExitCode::from(1)
        }
    }
}
