//! nftables in a test's namespace: loading a script with `nft -f -` (one
//! transaction) and listing a table in a form two tables can be compared
//! in (the kernel lists sets, maps and chains in creation order; nft sorts
//! elements).

use std::io::Write;
use std::process::Stdio;

use crate::netns::Netns;
use crate::{Error, Result};

/// Loads `script` in `ns` with `nft -f -`.
pub fn load(ns: &Netns, script: &str) -> Result<()> {
    let mut child = ns
        .cmd("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes())?;
    }
    let o = child.wait_with_output()?;
    if !o.status.success() {
        return Err(Error::Other(format!(
            "nft -f refused:\n{}\n{script}",
            String::from_utf8_lossy(&o.stderr)
        )));
    }
    Ok(())
}

/// `nft list table FAMILY NAME` in `ns`, as its top-level blocks (sets,
/// maps, chains) in name order.
pub fn listing(ns: &Netns, family: &str, name: &str) -> Result<Vec<String>> {
    Ok(canonical(
        &ns.exec("nft", &["list", "table", family, name])?,
    ))
}

/// A table's listing as its top-level blocks in name order.
pub fn canonical(listing: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut cur = String::new();
    for line in listing.lines() {
        if line.starts_with('\t') && !line.starts_with("\t\t") && line != "\t}" {
            cur = String::new();
        }
        cur.push_str(line);
        cur.push('\n');
        if line == "\t}" {
            blocks.push(std::mem::take(&mut cur));
        }
    }
    blocks.sort();
    blocks
}
