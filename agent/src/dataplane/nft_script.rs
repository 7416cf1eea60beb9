//! Loading an nftables script: one `nft -f -` run, one kernel transaction
//! (all of it applies or none of it does). Margay's tables are rendered
//! elsewhere (natOutgoing in [`super::nat`], NetworkPolicy by
//! `margay-policy`, the tunnel filter in [`super::tunnel_filter`]); this
//! module only hands them to the kernel, and lists them back as JSON.

use super::Error;

/// Loads `script` (about `what`, for the error) in one transaction.
pub async fn load(script: &str, what: &str) -> super::Result<()> {
    run(script, what, false).await
}

/// Whether the kernel would take `script` (checked, nothing changed:
/// `nft --check`, which sends the transaction and aborts it).
pub async fn check(script: &str, what: &str) -> super::Result<()> {
    run(script, what, true).await
}

async fn run(script: &str, what: &str, check_only: bool) -> super::Result<()> {
    let args: &[&str] = if check_only {
        &["-c", "-f", "-"]
    } else {
        &["-f", "-"]
    };
    let mut child = tokio::process::Command::new("nft")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(not_run)?;
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().expect("piped");
        stdin
            .write_all(script.as_bytes())
            .await
            .map_err(|e| Error::Nft(format!("writing to nft: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| Error::Nft(format!("waiting for nft: {e}")))?;
    succeeded(out, || format!("nft refused the {what} table")).map(drop)
}

/// Runs `nft -j ARGS` (a listing) and returns what it printed.
pub async fn list_json(args: &[&str]) -> super::Result<String> {
    let out = tokio::process::Command::new("nft")
        .arg("-j")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(not_run)?;
    let out = succeeded(out, || format!("nft -j {}", args.join(" ")))?;
    String::from_utf8(out.stdout).map_err(|e| Error::Nft(format!("nft printed non-UTF-8: {e}")))
}

/// `nft` could not be run.
fn not_run(e: std::io::Error) -> Error {
    Error::Nft(format!("running nft (is nftables installed?): {e}"))
}

/// `out`, when nft succeeded; else what it said, after `what`.
fn succeeded(
    out: std::process::Output,
    what: impl FnOnce() -> String,
) -> super::Result<std::process::Output> {
    if !out.status.success() {
        return Err(Error::Nft(format!(
            "{}: {}",
            what(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out)
}

/// One set of a table in an `nft -f` script:
/// `  set NAME { type KIND; [flags FLAGS; ][elements = { A, B }; ]}`.
pub(super) fn set<T: std::fmt::Display>(
    name: &str,
    kind: &str,
    flags: Option<&str>,
    elements: impl Iterator<Item = T>,
) -> String {
    let mut s = format!("  set {name} {{ type {kind}; ");
    if let Some(f) = flags {
        s.push_str(&format!("flags {f}; "));
    }
    let elements: Vec<String> = elements.map(|e| e.to_string()).collect();
    if !elements.is_empty() {
        s.push_str(&format!("elements = {{ {} }}; ", elements.join(", ")));
    }
    s.push_str("}\n");
    s
}
