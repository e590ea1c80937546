//! The `confab` binary: the server (`serve`), its administration (`admin`)
//! and the command-line client (`register`, `login`, `send`, `chat`, ...).

mod bench;
mod cli;
mod serve;

use clap::{Parser, Subcommand};

/// mimalloc instead of glibc's allocator: glibc kept every thread's arena at
/// its high-water mark (the 19 MiB Argon2 buffers of logins left ~58 MiB per
/// blocking thread resident), and mimalloc is faster with many small
/// allocations across threads (docs/performance.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "confab",
    version,
    about = "confab: a messaging server and its command-line client",
    args_override_self = true
)]
struct Cli {
    #[command(flatten)]
    common: cli::Common,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (HTTP + WebSocket; data in one SQLite file, or PostgreSQL).
    Serve(Box<serve::ServeArgs>),
    /// Load-test a server: throughput, latency or idle connections.
    Bench(bench::BenchArgs),
    /// Administer a server's data.
    #[command(subcommand)]
    Admin(AdminCommand),
    #[command(flatten)]
    Client(cli::ClientCommand),
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Write a consistent copy of the database to FILE; safe while the server
    /// runs. On PostgreSQL (`--database`), FILE is `pg_dump`'s custom format,
    /// restored with `pg_restore`; pg_dump must be installed.
    Backup {
        /// Where to write the copy (must not exist).
        file: std::path::PathBuf,
        /// The server's data directory.
        #[arg(long, env = "CONFAB_DATA_DIR", default_value = "confab-data")]
        data_dir: std::path::PathBuf,
        /// The server's PostgreSQL database, if it runs on one.
        #[arg(long, env = "CONFAB_DATABASE_URL")]
        database: Option<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "serve") {
        args = serve::with_config_file(args, &serve_settings())?;
    }
    let cli = Cli::parse_from(args);
    match cli.command {
        Command::Serve(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(serve::run(*args))
        }
        Command::Bench(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(bench::run(args))
        }
        Command::Admin(AdminCommand::Backup {
            file,
            data_dir: _,
            database: Some(url),
        }) => {
            pg_dump(&url, &file)?;
            println!("backup written to {} (pg_restore reads it)", file.display());
            Ok(())
        }
        Command::Admin(AdminCommand::Backup {
            file,
            data_dir,
            database: None,
        }) => {
            confab_store::sqlite::SqliteStore::backup(&data_dir, &file)?;
            println!("backup written to {}", file.display());
            Ok(())
        }
        Command::Client(command) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            if let Err(failure) = runtime.block_on(cli::run(cli.common, command)) {
                eprintln!("confab: {}", cli::output::safe(&failure.message));
                std::process::exit(failure.code);
            }
            Ok(())
        }
    }
}

/// The settings `serve` reads from the environment: what its config file
/// may set.
fn serve_settings() -> Vec<serve::Setting> {
    use clap::CommandFactory;
    let cli = Cli::command();
    let serve = cli.find_subcommand("serve").expect("serve is a subcommand");
    serve
        .get_arguments()
        .filter_map(|a| {
            Some(serve::Setting {
                env: a.get_env()?.to_string_lossy().into_owned(),
                flag: a.get_long()?.to_string(),
                takes_value: a.get_action().takes_values(),
            })
        })
        .collect()
}

/// `pg_dump --format=custom` of the database at `url` into `file`, which is
/// created for the owner alone (it holds every account's password hash).
fn pg_dump(url: &str, file: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::os::unix::fs::OpenOptionsExt;
    let out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(file)
        .with_context(|| format!("cannot create {}", file.display()))?;
    let status = std::process::Command::new("pg_dump")
        .args(["--format=custom", "--dbname", url])
        .stdout(out)
        .status()
        .context("cannot run pg_dump (install PostgreSQL's client tools)")?;
    if !status.success() {
        let _ = std::fs::remove_file(file);
        anyhow::bail!("pg_dump failed ({status})");
    }
    Ok(())
}
