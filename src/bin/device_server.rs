//! `burn-distill-device-server`: hosts this machine's devices for burn-remote clients, so a
//! teacher can run here while its students train elsewhere.
//!
//! ```text
//! # on the teacher's machine (a GPU box):
//! cargo run --release --features cuda --bin burn-distill-device-server -- --listen 0.0.0.0:3000 --devices cuda
//! # on the student's machine: any `--teacher-device ws://gpu-box:3000` (device 0 of that server)
//! ```
//!
//! The transport is WebSocket: unencrypted, for a trusted network. It listens on 127.0.0.1
//! unless told otherwise; `BURN_DISTILL_DEVICE_TOKEN` makes clients present that token. The
//! server prints `listening on ws://ADDRESS` once bound (port 0 picks a free port) and serves
//! until Ctrl+C or SIGTERM.

use std::io::Write;
use std::net::TcpListener;
use std::process::ExitCode;

use burn::server::{RemoteServer, TokenAuthorizer, WebSocketTransport};
use clap::Parser;

/// Host this machine's devices for burn-remote clients (a teacher on another machine).
#[derive(Parser, Debug)]
#[command(name = "burn-distill-device-server", version)]
struct Args {
    /// Address to listen on; port 0 picks a free one. WebSocket is unencrypted: keep it on a
    /// trusted network.
    #[arg(long, default_value = "127.0.0.1:3000")]
    listen: String,
    /// Devices to host, comma-separated, of one backend (`flex`, `wgpu`, `cuda`, `cuda:N`); a client
    /// picks one by its position.
    #[arg(long, value_delimiter = ',', default_value = "flex")]
    devices: Vec<String>,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("burn-distill-device-server: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    let devices = args
        .devices
        .iter()
        .map(|name| match name.starts_with("ws://") {
            true => Err(format!("--devices {name}: a device server hosts local devices")),
            false => burn_distill::open_device(name).map_err(|err| format!("--devices: {err}")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    if devices.is_empty() {
        return Err("--devices: name at least one device".into());
    }
    let listener = TcpListener::bind(&args.listen).map_err(|err| format!("--listen {}: {err}", args.listen))?;
    let address = listener.local_addr().map_err(|err| err.to_string())?;
    let mut server = RemoteServer::new(devices);
    match std::env::var("BURN_DISTILL_DEVICE_TOKEN") {
        Ok(token) => {
            let authorizer =
                TokenAuthorizer::new(token).map_err(|_| "BURN_DISTILL_DEVICE_TOKEN is empty".to_string())?;
            server = server.with_authorizer(authorizer);
        }
        Err(std::env::VarError::NotPresent) => {}
        Err(err) => return Err(format!("BURN_DISTILL_DEVICE_TOKEN: {err}")),
    }
    // Clients (and the tests) wait for this line before they connect.
    println!("listening on ws://{address} ({})", args.devices.join(","));
    std::io::stdout().flush().map_err(|err| err.to_string())?;
    server
        .serve(WebSocketTransport::from_listener(listener))
        .map_err(|err| format!("serving on {address}: {err}"))
}
