//! What is read back (pure): the API server's `/metrics` text (watch
//! events and their bytes per kind, watchers per kind, requests), and a
//! process's `/proc/PID/status`, `/proc/PID/stat` and command line.

use std::collections::BTreeMap;

/// One sample of the Prometheus text format: name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name (with `_sum`, `_count`, `_bucket` as written).
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

/// The samples of a Prometheus text exposition; comments, blank and
/// malformed lines are skipped. Label values may hold `,`, `}` and escapes
/// (`\"`, `\\`, `\n`).
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = line[..name_end].to_string();
    let (labels, rest) = match line[name_end..].strip_prefix('{') {
        Some(r) => parse_labels(r)?,
        None => (BTreeMap::new(), &line[name_end..]),
    };
    let value = match rest.split_whitespace().next()? {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// `k="v",...}` (after the `{`): the labels and what follows the `}`.
/// Scans bytes: the delimiters are ASCII, which no byte of a multi-byte
/// UTF-8 character equals.
fn parse_labels(r: &str) -> Option<(BTreeMap<String, String>, &str)> {
    let b = r.as_bytes();
    let mut i = 0;
    let mut labels = BTreeMap::new();
    loop {
        while i < b.len() && (b[i] == b',' || b[i].is_ascii_whitespace()) {
            i += 1;
        }
        if *b.get(i)? == b'}' {
            return Some((labels, &r[i + 1..]));
        }
        let eq = i + r[i..].find('=')?;
        let key = r[i..eq].trim().to_string();
        i = eq + 1;
        if b.get(i) != Some(&b'"') {
            return None;
        }
        i += 1;
        let mut value = Vec::new();
        loop {
            let c = *b.get(i)?;
            i += 1;
            match c {
                b'\\' => {
                    let e = *b.get(i)?;
                    i += 1;
                    value.push(if e == b'n' { b'\n' } else { e });
                }
                b'"' => break,
                _ => value.push(c),
            }
        }
        labels.insert(key, String::from_utf8(value).ok()?);
    }
}

/// The figures of one `/metrics` read the bench uses.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Api {
    /// `apiserver_watch_events_total` by kind.
    pub watch_events: BTreeMap<String, f64>,
    /// `apiserver_watch_events_sizes_sum` (bytes) by kind.
    pub watch_bytes: BTreeMap<String, f64>,
    /// `apiserver_registered_watchers` by kind.
    pub watchers: BTreeMap<String, f64>,
    /// `apiserver_request_total` of what agents touch, by (verb, resource).
    pub requests: BTreeMap<(String, String), f64>,
}

/// The resources agents read or write; the apiserver's own loops touch
/// others (services, flow control, its own namespaces' reads).
fn agents_use(group: &str, resource: &str, verb: &str) -> bool {
    group == "margay.dev"
        || (group.is_empty() && matches!(resource, "nodes" | "pods" | "secrets"))
        // The apiserver GETs its own namespaces every minute.
        || (group.is_empty() && resource == "namespaces" && verb != "GET")
        || (group == "coordination.k8s.io" && resource == "leases")
        || (group == "networking.k8s.io" && resource == "networkpolicies")
        || (group.is_empty() && resource == "events")
}

/// A kind's name with its group when it has one (`Pod`, `IPAMBlock.margay.dev`).
fn kind_of(l: &BTreeMap<String, String>) -> String {
    let kind = l.get("kind").or_else(|| l.get("resource"));
    let kind = kind.map_or("", String::as_str);
    match l.get("group").map(String::as_str) {
        None | Some("") => kind.to_string(),
        Some(g) => format!("{kind}.{g}"),
    }
}

impl Api {
    /// From the text of `/metrics`.
    pub fn from_text(text: &str) -> Self {
        let mut out = Api::default();
        for s in parse(text) {
            match s.name.as_str() {
                "apiserver_watch_events_total" => {
                    *out.watch_events.entry(kind_of(&s.labels)).or_default() += s.value;
                }
                "apiserver_watch_events_sizes_sum" => {
                    *out.watch_bytes.entry(kind_of(&s.labels)).or_default() += s.value;
                }
                "apiserver_registered_watchers" => {
                    *out.watchers.entry(kind_of(&s.labels)).or_default() += s.value;
                }
                "apiserver_request_total" => {
                    let l = &s.labels;
                    let get = |k: &str| l.get(k).map_or("", String::as_str);
                    if !agents_use(get("group"), get("resource"), get("verb")) {
                        continue;
                    }
                    let res = match get("subresource") {
                        "" => get("resource").to_string(),
                        sub => format!("{}/{sub}", get("resource")),
                    };
                    *out.requests
                        .entry((get("verb").to_string(), res))
                        .or_default() += s.value;
                }
                _ => {}
            }
        }
        out
    }

    /// What grew from `before` to `self` (counters; a counter that went
    /// down, the apiserver restarted, counts from zero).
    pub fn since(&self, before: &Api) -> Api {
        fn d<K: Ord + Clone>(a: &BTreeMap<K, f64>, b: &BTreeMap<K, f64>) -> BTreeMap<K, f64> {
            a.iter()
                .map(|(k, v)| {
                    let was = b.get(k).copied().unwrap_or(0.0);
                    (k.clone(), if *v >= was { v - was } else { *v })
                })
                .collect()
        }
        Api {
            watch_events: d(&self.watch_events, &before.watch_events),
            watch_bytes: d(&self.watch_bytes, &before.watch_bytes),
            watchers: self.watchers.clone(),
            requests: d(&self.requests, &before.requests),
        }
    }

    /// Watch events sent for `kind`.
    pub fn events(&self, kind: &str) -> f64 {
        self.watch_events.get(kind).copied().unwrap_or(0.0)
    }

    /// Bytes of watch events sent for `kind`.
    pub fn bytes(&self, kind: &str) -> f64 {
        self.watch_bytes.get(kind).copied().unwrap_or(0.0)
    }

    /// Watchers registered for `kind`.
    pub fn watchers_of(&self, kind: &str) -> f64 {
        self.watchers.get(kind).copied().unwrap_or(0.0)
    }

    /// Every request counted.
    pub fn requests_total(&self) -> f64 {
        self.requests.values().sum()
    }

    /// Requests counted, less `verb` on `resource` (what the bench itself
    /// wrote in the window, e.g. the fake nodes' status).
    pub fn requests_less(&self, verb: &str, resource: &str, n: f64) -> f64 {
        let mine = self
            .requests
            .get(&(verb.to_string(), resource.to_string()))
            .copied()
            .unwrap_or(0.0);
        self.requests_total() - n.min(mine)
    }
}

/// `VmRSS` in KiB from `/proc/PID/status`.
pub fn rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// `utime + stime` in clock ticks from `/proc/PID/stat` (the fields after
/// the command, which may itself hold spaces and parentheses).
pub fn cpu_ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // After ")": state(3) ppid(4) ... utime(14) stime(15): indexes 11, 12.
    let u: u64 = f.get(11)?.parse().ok()?;
    let s: u64 = f.get(12)?.parse().ok()?;
    Some(u + s)
}

/// The value of `--flag=VALUE` (or `--flag VALUE`) in a command line.
pub fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let eq = format!("{name}=");
    args.iter().enumerate().find_map(|(i, a)| {
        if let Some(v) = a.strip_prefix(&eq) {
            Some(v)
        } else if a == name {
            args.get(i + 1).map(String::as_str)
        } else {
            None
        }
    })
}

/// The port of a URL such as `https://127.0.0.1:6443` or `http://h:2379/`.
pub fn url_port(url: &str) -> Option<u16> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let host_port = rest.split('/').next()?;
    host_port.rsplit_once(':')?.1.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP apiserver_watch_events_total [ALPHA] Number of events sent in watch clients
# TYPE apiserver_watch_events_total counter
apiserver_watch_events_total{group="",kind="Pod",version="v1"} 1500
apiserver_watch_events_total{group="",kind="Node",version="v1"} 30
apiserver_watch_events_total{group="margay.dev",kind="IPAMBlock",version="v1"} 7
apiserver_watch_events_sizes_bucket{group="",kind="Pod",version="v1",le="1024"} 3
apiserver_watch_events_sizes_bucket{group="",kind="Pod",version="v1",le="+Inf"} 1500
apiserver_watch_events_sizes_sum{group="",kind="Pod",version="v1"} 3.0e+06
apiserver_watch_events_sizes_count{group="",kind="Pod",version="v1"} 1500
apiserver_registered_watchers{group="",kind="Pod",version="v1"} 5
apiserver_request_total{code="200",component="apiserver",dry_run="",group="",resource="pods",scope="namespace",subresource="status",verb="PATCH",version="v1"} 12
apiserver_request_total{code="201",component="apiserver",dry_run="",group="",resource="pods",scope="namespace",subresource="",verb="POST",version="v1"} 10
apiserver_request_total{code="200",component="apiserver",dry_run="",group="coordination.k8s.io",resource="leases",scope="namespace",subresource="",verb="PUT",version="v1"} 4
apiserver_request_total{code="200",component="apiserver",dry_run="",group="",resource="",scope="",subresource="/metrics",verb="GET",version=""} 9
apiserver_request_total{code="200",component="apiserver",dry_run="",group="",resource="services",scope="cluster",subresource="",verb="LIST",version="v1"} 4
apiserver_request_total{code="200",component="apiserver",dry_run="",group="",resource="namespaces",scope="resource",subresource="",verb="GET",version="v1"} 6
apiserver_request_total{code="0",component="apiserver",dry_run="",group="",resource="namespaces",scope="cluster",subresource="",verb="WATCH",version="v1"} 3
"#;

    #[test]
    fn parses_labels_with_commas_braces_and_escapes() {
        let s =
            parse("m{a=\"x,y\",b=\"}\",c=\"q\\\"uote\\\\\"} 2.5\nbare 3\n# c\n\nbad{a=\"x\" 1\n");
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].name, "m");
        assert_eq!(s[0].labels["a"], "x,y");
        assert_eq!(s[0].labels["b"], "}");
        assert_eq!(s[0].labels["c"], "q\"uote\\");
        assert_eq!(s[0].value, 2.5);
        assert_eq!(s[1].name, "bare");
        assert!(s[1].labels.is_empty());
        let inf = parse("x_bucket{le=\"+Inf\"} +Inf\n");
        assert!(inf[0].value.is_infinite());
    }

    #[test]
    fn watch_events_bytes_watchers_and_agent_requests() {
        let a = Api::from_text(TEXT);
        assert_eq!(a.events("Pod"), 1500.0);
        assert_eq!(a.events("Node"), 30.0);
        assert_eq!(a.events("IPAMBlock.margay.dev"), 7.0);
        assert_eq!(a.bytes("Pod"), 3.0e6);
        assert_eq!(a.watchers_of("Pod"), 5.0);
        // Not the apiserver's own GETs of namespaces, nor services.
        assert_eq!(a.requests_total(), 29.0);
        assert_eq!(a.requests[&("WATCH".into(), "namespaces".into())], 3.0);
        assert_eq!(a.requests[&("PATCH".into(), "pods/status".into())], 12.0);
        // The bench's own writes come off.
        assert_eq!(a.requests_less("PATCH", "pods/status", 10.0), 19.0);
        assert_eq!(a.requests_less("PATCH", "pods/status", 50.0), 17.0);
    }

    #[test]
    fn differences_of_counters() {
        let before = Api::from_text(TEXT);
        let after = Api::from_text(
            &TEXT
                .replace(
                    "kind=\"Pod\",version=\"v1\"} 1500",
                    "kind=\"Pod\",version=\"v1\"} 1800",
                )
                .replace("} 3.0e+06", "} 3.6e+06"),
        );
        let d = after.since(&before);
        assert_eq!(d.events("Pod"), 300.0);
        assert_eq!(d.bytes("Pod"), 600_000.0);
        assert_eq!(d.events("Node"), 0.0);
        assert_eq!(d.watchers_of("Pod"), 5.0);
        // A restarted apiserver counts from zero.
        let d = before.since(&after);
        assert_eq!(d.events("Pod"), 1500.0);
    }

    #[test]
    fn proc_files_and_command_lines() {
        assert_eq!(
            rss_kib("Name:\tmargay-agent\nVmHWM:\t  30000 kB\nVmRSS:\t   23456 kB\n"),
            Some(23456)
        );
        assert_eq!(rss_kib("Name: x\n"), None);
        let stat =
            "1234 (margay (x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 9 0 100 0 0";
        assert_eq!(cpu_ticks(stat), Some(325));
        assert_eq!(cpu_ticks("garbage"), None);
        let args: Vec<String> = [
            "kube-apiserver",
            "--etcd-servers=http://127.0.0.1:40001",
            "--secure-port=40003",
            "--v",
            "0",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(flag(&args, "--secure-port"), Some("40003"));
        assert_eq!(flag(&args, "--v"), Some("0"));
        assert_eq!(flag(&args, "--nope"), None);
        assert_eq!(url_port("http://127.0.0.1:40001"), Some(40001));
        assert_eq!(url_port("https://127.0.0.1:6443/"), Some(6443));
        assert_eq!(url_port("https://127.0.0.1"), None);
    }
}
