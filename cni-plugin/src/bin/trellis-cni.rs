//! `trellis-cni`: the chained CNI plugin. See `trellis_cni_plugin::plugin`.

use std::io::{Read, Write};
use std::process::ExitCode;

use trellis_cni_plugin::plugin::{Env, run};

fn main() -> ExitCode {
    let mut stdin = Vec::new();
    if let Err(e) = std::io::stdin().take(1 << 20).read_to_end(&mut stdin) {
        let error = serde_json::json!({
            "cniVersion": "1.1.0", "code": 5, "msg": "cannot read the network configuration", "details": e.to_string(),
        });
        println!("{error}");
        return ExitCode::FAILURE;
    }
    let mut out = std::io::stdout().lock();
    match run(&Env::from_process(), &stdin) {
        Ok(Some(v)) => {
            let _ = writeln!(out, "{v}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err((e, version)) => {
            let _ = writeln!(out, "{}", e.to_json(&version));
            eprintln!("trellis-cni: {}: {}", e.msg, e.details);
            ExitCode::FAILURE
        }
    }
}
