//! Load generator for the signaling server.
//!
//! Each subcommand is one scenario. It prints a single JSON line with the
//! results on stdout and a short human-readable summary on stderr.

mod broadcast;
mod churn;
mod client;
mod connect;
mod cpu;
mod fanout;
mod rawws;
mod relay;
mod resume;
mod stats;
mod tracker;
mod view;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "signaling-bench",
    version,
    about = "Load generator for the signaling server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Offer/answer round trips between peers of many topics.
    Relay(relay::RelayArgs),
    /// Open and hold many connections: join rate, join latency, server memory.
    Connect(connect::ConnectArgs),
    /// Peers joining and leaving topics; checks that presence stays exact.
    Churn(churn::ChurnArgs),
    /// Many peers joining one topic at once; time until every view is complete.
    Fanout(fanout::FanoutArgs),
    /// Relays to sessions whose connections are cut at random and resumed:
    /// messages lost and duplicated, resume latency, a suspended session's memory.
    Resume(resume::ResumeArgs),
    /// One sender and many receivers in one topic: server CPU per delivered
    /// copy of a broadcast, next to the same copies sent as relays.
    Broadcast(broadcast::BroadcastArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Many connections need many descriptors; the hard limit is the bound.
    client::raise_nofile_limit();
    let threads = match &cli.command {
        Command::Relay(args) => args.threads,
        Command::Connect(args) => args.threads,
        Command::Churn(args) => args.threads,
        Command::Fanout(args) => args.threads,
        Command::Resume(args) => args.threads,
        Command::Broadcast(args) => args.threads,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Relay(args) => relay::run(args).await,
            Command::Connect(args) => connect::run(args).await,
            Command::Churn(args) => churn::run(args).await,
            Command::Fanout(args) => fanout::run(args).await,
            Command::Resume(args) => resume::run(args).await,
            Command::Broadcast(args) => broadcast::run(args).await,
        }
    });
    // Tasks still parked on dead sockets must not hold the exit up.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}
