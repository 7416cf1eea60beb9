//! `margay`: the CNI plugin. Reads the configuration from stdin and the
//! CNI_* variables, forwards the verb to margay-agent over its unix socket,
//! prints the result (or the CNI error JSON and exits 1). No logic beyond
//! parsing and translating.

use std::io::{Read, Write};
use std::process::ExitCode;

use margay_cni::client;
use margay_cni::spec::{self, CniError, Command, code};

fn emit(v: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
}

fn fail(e: &CniError, version: &str) -> ExitCode {
    emit(&e.to_json(version));
    ExitCode::from(1)
}

fn main() -> ExitCode {
    let env = match spec::parse_env(|k| std::env::var(k).ok()) {
        Ok(e) => e,
        Err(e) => return fail(&e, "1.1.0"),
    };
    if env.command == Command::Version {
        emit(&spec::version_json());
        return ExitCode::SUCCESS;
    }
    let mut stdin = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
        return fail(
            &CniError::new(code::IO, format!("reading stdin: {e}")),
            "1.1.0",
        );
    }
    let conf = match spec::parse_conf(&stdin, margay_proto::DEFAULT_SOCKET) {
        Ok(c) => c,
        Err(e) => return fail(&e, "1.1.0"),
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return fail(
                &CniError::new(code::IO, format!("runtime: {e}")),
                &conf.version,
            );
        }
    };
    match rt.block_on(client::call(&env, &conf)) {
        Ok(Some(result)) if env.command == Command::Add => {
            emit(&spec::render(&result, &conf.version));
            ExitCode::SUCCESS
        }
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => fail(&e, &conf.version),
    }
}
