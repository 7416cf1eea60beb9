//! The supervisor's control socket protocol: per connection, one JSON
//! [`Request`] line from the CLI (`{"op": "pod_add", ...}`) and one JSON
//! [`Reply`] line back (`{"ok": true, ...}`, or `{"ok": false, "error":
//! "..."}`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use margay_lab::cluster::{Matrix, PodOpts};
use serde::{Deserialize, Serialize};

/// What the CLI asks the supervisor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// `pod add`.
    PodAdd(PodAdd),
    /// `pod del`.
    PodDel {
        /// The pod.
        name: String,
    },
    /// `check`: routes and the ping matrix.
    Check,
    /// `image`: an image archive into every real node (`--kubernetes`).
    Import {
        /// The archive.
        archive: PathBuf,
    },
}

/// `pod add`: a lab pod on `node`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PodAdd {
    /// Its node.
    pub node: String,
    /// Its name.
    pub name: String,
    /// Its namespace (`default` if none).
    pub namespace: Option<String>,
    /// Its labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Its listeners (`tcp:80`, ...).
    #[serde(default)]
    pub serve: Vec<String>,
}

impl PodAdd {
    /// What the lab makes the pod with beyond its node and name.
    pub fn opts(&self) -> PodOpts {
        PodOpts {
            namespace: self.namespace.clone(),
            labels: self.labels.clone(),
            serve: self.serve.clone(),
            ..Default::default()
        }
    }
}

/// The supervisor's answer: whether it went well, and what was asked for
/// or why it failed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    /// False when the request failed, or a check found gaps or failures.
    pub ok: bool,
    /// The rest of the answer.
    #[serde(flatten)]
    pub answer: Answer,
}

/// What a [`Reply`] carries beside `ok` (told apart by its fields).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Answer {
    /// The request failed.
    Failed {
        /// Why.
        error: String,
    },
    /// [`Request::PodAdd`]: the pod's address.
    PodAdded {
        /// Its IPv4 address.
        ip: String,
    },
    /// [`Request::Check`].
    Checked {
        /// Routes missing.
        route_gaps: Vec<String>,
        /// Who reaches whom.
        matrix: Matrix,
    },
    /// [`Request::Import`]: into how many nodes.
    Imported {
        /// Nodes that took the archive.
        nodes: usize,
    },
    /// Done, nothing to tell ([`Request::PodDel`]).
    Done {},
}

impl Reply {
    /// A request that went well.
    pub fn ok(answer: Answer) -> Self {
        Self { ok: true, answer }
    }

    /// A request that failed, for `error`.
    pub fn failed(error: String) -> Self {
        Self {
            ok: false,
            answer: Answer::Failed { error },
        }
    }

    /// A check's answer: ok when no route is missing and every pod
    /// reached every other.
    pub fn checked(route_gaps: Vec<String>, matrix: Matrix) -> Self {
        Self {
            ok: route_gaps.is_empty() && matrix.failures.is_empty(),
            answer: Answer::Checked { route_gaps, matrix },
        }
    }

    /// The answer, or the error of a failed request.
    pub fn into_answer(self) -> anyhow::Result<Answer> {
        match self.answer {
            Answer::Failed { error } if !self.ok => anyhow::bail!("{error}"),
            a => Ok(a),
        }
    }
}

/// `v` as one JSON line.
pub fn line<T: Serialize>(v: &T) -> anyhow::Result<String> {
    Ok(format!("{}\n", serde_json::to_string(v)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    /// `typed` is written as `old` (what the untyped protocol wrote) and
    /// read back from it.
    fn same<T>(typed: &T, old: Value)
    where
        T: Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        let text = line(typed).unwrap();
        let written: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(written, old, "{text}");
        let read: T = serde_json::from_str(&format!("{old}\n")).unwrap();
        assert_eq!(
            serde_json::to_value(&read).unwrap(),
            old,
            "{read:?} read from {old}"
        );
    }

    #[test]
    fn requests_are_the_json_they_were() {
        let labels = BTreeMap::from([("app".to_string(), "web".to_string())]);
        same(
            &Request::PodAdd(PodAdd {
                node: "node1".into(),
                name: "p".into(),
                namespace: None,
                labels: labels.clone(),
                serve: vec!["tcp:80".into()],
            }),
            json!({"op": "pod_add", "node": "node1", "name": "p",
                "namespace": null, "labels": {"app": "web"}, "serve": ["tcp:80"]}),
        );
        same(
            &Request::PodAdd(PodAdd {
                node: "node2".into(),
                name: "q".into(),
                namespace: Some("team".into()),
                labels: BTreeMap::new(),
                serve: Vec::new(),
            }),
            json!({"op": "pod_add", "node": "node2", "name": "q",
                "namespace": "team", "labels": {}, "serve": []}),
        );
        same(
            &Request::PodDel { name: "p".into() },
            json!({"op": "pod_del", "name": "p"}),
        );
        same(&Request::Check, json!({"op": "check"}));
        same(
            &Request::Import {
                archive: PathBuf::from("/tmp/img/margay.tar"),
            },
            json!({"op": "import", "archive": PathBuf::from("/tmp/img/margay.tar")}),
        );
        // Read as the untyped supervisor read them: labels and serve
        // may be left out.
        let bare: Request =
            serde_json::from_str(r#"{"op":"pod_add","node":"node1","name":"p"}"#).unwrap();
        assert_eq!(
            bare,
            Request::PodAdd(PodAdd {
                node: "node1".into(),
                name: "p".into(),
                namespace: None,
                labels: BTreeMap::new(),
                serve: Vec::new(),
            })
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"reboot"}"#).is_err());
    }

    #[test]
    fn replies_are_the_json_they_were() {
        same(
            &Reply::ok(Answer::PodAdded {
                ip: "10.244.0.5".into(),
            }),
            json!({"ok": true, "ip": "10.244.0.5"}),
        );
        same(&Reply::ok(Answer::Done {}), json!({"ok": true}));
        same(
            &Reply::ok(Answer::Imported { nodes: 3 }),
            json!({"ok": true, "nodes": 3}),
        );
        same(
            &Reply::failed("no pod named \"x\"".into()),
            json!({"ok": false, "error": "no pod named \"x\""}),
        );
        let m = Matrix {
            nodes: vec!["node1".into()],
            total: 2,
            failures: vec!["p -> 10.244.0.6".into()],
            pairs: Vec::new(),
        };
        same(
            &Reply::checked(
                vec!["node1 has no route to 10.244.1.0/26 (node2)".into()],
                m.clone(),
            ),
            json!({"ok": false, "route_gaps": ["node1 has no route to 10.244.1.0/26 (node2)"],
                "matrix": m}),
        );
        let fine = Matrix {
            failures: Vec::new(),
            ..m
        };
        same(
            &Reply::checked(Vec::new(), fine.clone()),
            json!({"ok": true, "route_gaps": [], "matrix": fine}),
        );
    }

    #[test]
    fn a_failed_reply_is_an_error_and_a_failed_check_is_not() {
        let e = Reply::failed("boom".into()).into_answer().unwrap_err();
        assert_eq!(e.to_string(), "boom");
        let checked = Reply::checked(vec!["gap".into()], Matrix::default());
        assert!(!checked.ok);
        assert!(matches!(
            checked.into_answer().unwrap(),
            Answer::Checked { .. }
        ));
    }
}
