//! The keyward binary: command line -> configuration -> runtime -> run.
//!
//! Exit codes: 0 after a clean shutdown (or a valid `--check-config`),
//! 2 for an invalid configuration, 1 when start-up fails (a port in use).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use keyward::config::{Config, ConfigError};
use tokio_util::sync::CancellationToken;

/// A Redis-protocol smart proxy.
#[derive(Debug, Parser)]
#[command(name = "keyward", version, about)]
struct Cli {
    /// TOML configuration file (see config/keyward.toml for every key).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to accept Redis clients on (server.listen).
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Redis server to forward to (upstream.address).
    #[arg(long, value_name = "HOST:PORT")]
    upstream: Option<String>,
    /// HTTP admin address: health, metrics, JSON views, the /ui dashboard (admin.listen).
    #[arg(long, value_name = "ADDR")]
    admin_listen: Option<String>,
    /// A Sentinel to follow (repeatable); replaces --upstream (sentinel.addresses).
    #[arg(long = "sentinel", value_name = "HOST:PORT")]
    sentinels: Vec<String>,
    /// The master name the Sentinels monitor (sentinel.master_name).
    #[arg(long, value_name = "NAME")]
    master_name: Option<String>,
    /// Near-cache budget in MiB; 0 disables the cache (cache.max_mb).
    #[arg(long, value_name = "N")]
    cache_mb: Option<usize>,
    /// Folder for the near cache's warm-up list (cache.state_dir).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<String>,
    /// Log line format: json or text (log.format).
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<String>,
    /// Log filter, e.g. info, debug, keyward=trace (log.level).
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,
    /// Validate the configuration, print the effective one and exit (0 or 2).
    #[arg(long)]
    check_config: bool,
}

fn load(cli: &Cli) -> Result<Config, ConfigError> {
    let mut config = match &cli.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| ConfigError(vec![format!("cannot read {}: {e}", path.display())]))?;
            Config::from_toml(&text)?
        }
        None => Config::default(),
    };
    if let Some(v) = &cli.listen {
        config.server.listen = v.clone();
    }
    if let Some(v) = &cli.upstream {
        config.upstream.address = v.clone();
    }
    if let Some(v) = &cli.admin_listen {
        config.admin.listen = v.clone();
    }
    if !cli.sentinels.is_empty() {
        config.sentinel.addresses = cli.sentinels.clone();
    }
    if let Some(v) = &cli.state_dir {
        config.cache.state_dir = v.clone();
    }
    if let Some(v) = cli.cache_mb {
        config.cache.max_mb = v;
    }
    if let Some(v) = &cli.log_format {
        config.log.format = v.clone();
    }
    if let Some(v) = &cli.log_level {
        config.log.level = v.clone();
    }
    if let Some(v) = &cli.master_name {
        config.sentinel.master_name = v.clone();
    }
    config.validate()?;
    Ok(config)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match load(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("keyward: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.check_config {
        print!("{}", config.to_toml());
        return ExitCode::SUCCESS;
    }
    keyward::logging::init(&config.log.level, &config.log.format);
    // Each client is a socket; 10,000 clients need more than the usual 1024.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) if n < (config.server.max_clients as u64) * 2 + 64 => {
            tracing::warn!(
                nofile = n,
                max_clients = config.server.max_clients,
                "open-file limit is low for server.max_clients"
            );
        }
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
        _ => {}
    }
    // One thread runs an event loop like Redis's and twemproxy's: no
    // cross-thread wake-ups, the fastest choice when Redis and the clients
    // share the machine. More threads use tokio's work-stealing scheduler.
    let mut builder = match config.server.threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("keyward: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async move {
        let listeners = match keyward::bind(&config).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "start-up failed");
                eprintln!("keyward: {e}");
                return ExitCode::from(1);
            }
        };
        let shutdown = CancellationToken::new();
        tokio::spawn(keyward::shutdown::watch_signals(shutdown.clone()));
        keyward::run(config, listeners, shutdown).await;
        ExitCode::SUCCESS
    })
}
