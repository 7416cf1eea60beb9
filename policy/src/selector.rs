//! Label selectors as Kubernetes defines them: `matchLabels` (every pair
//! present) and `matchExpressions` (In, NotIn, Exists, DoesNotExist), all
//! ANDed; the empty selector selects everything.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use serde::Serialize;

use crate::{Error, Result};

/// An object's labels.
pub type Labels = BTreeMap<String, String>;

/// One `matchExpressions` requirement's operator and values.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "camelCase", tag = "op", content = "values")]
pub enum Op {
    /// The label is present with one of the values.
    In(BTreeSet<String>),
    /// The label is absent, or present with none of the values.
    NotIn(BTreeSet<String>),
    /// The label is present.
    Exists,
    /// The label is absent.
    DoesNotExist,
}

/// A `matchExpressions` entry.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Requirement {
    /// The label key.
    pub key: String,
    /// What it must satisfy.
    #[serde(flatten)]
    pub op: Op,
}

impl Requirement {
    fn matches(&self, labels: &Labels) -> bool {
        let v = labels.get(&self.key);
        match &self.op {
            Op::In(vals) => v.is_some_and(|v| vals.contains(v)),
            Op::NotIn(vals) => v.is_none_or(|v| !vals.contains(v)),
            Op::Exists => v.is_some(),
            Op::DoesNotExist => v.is_none(),
        }
    }
}

/// A label selector.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Selector {
    /// Pairs that must all be present.
    pub match_labels: Labels,
    /// Requirements that must all hold.
    pub expressions: Vec<Requirement>,
}

impl Selector {
    /// The empty selector: everything.
    pub fn everything() -> Self {
        Self::default()
    }

    /// A selector of `key=value` pairs.
    pub fn labels<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Self {
            match_labels: pairs
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            expressions: Vec::new(),
        }
    }

    /// Whether it selects everything.
    pub fn is_everything(&self) -> bool {
        self.match_labels.is_empty() && self.expressions.is_empty()
    }

    /// Whether `labels` satisfy it.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.expressions.iter().all(|r| r.matches(labels))
    }

    /// From the Kubernetes type; an unknown operator, In/NotIn without
    /// values or Exists/DoesNotExist with values is an error (the API
    /// server refuses them too).
    pub fn from_k8s(s: &LabelSelector) -> Result<Self> {
        let mut out = Self {
            match_labels: s.match_labels.clone().unwrap_or_default(),
            expressions: Vec::new(),
        };
        for e in s.match_expressions.iter().flatten() {
            let values: BTreeSet<String> = e.values.iter().flatten().cloned().collect();
            let op = match e.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err(Error::Selector(format!(
                        "{} {} needs values",
                        e.key, e.operator
                    )));
                }
                "In" => Op::In(values),
                "NotIn" => Op::NotIn(values),
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return Err(Error::Selector(format!(
                        "{} {} takes no values",
                        e.key, e.operator
                    )));
                }
                "Exists" => Op::Exists,
                "DoesNotExist" => Op::DoesNotExist,
                other => {
                    return Err(Error::Selector(format!(
                        "{}: unknown operator {other:?}",
                        e.key
                    )));
                }
            };
            out.expressions.push(Requirement {
                key: e.key.clone(),
                op,
            });
        }
        Ok(out)
    }
}

impl fmt::Display for Selector {
    /// `kubectl`'s selector syntax: `a=b,c in (d,e),f notin (g),h,!i`;
    /// the empty selector is `<all>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_everything() {
            return f.write_str("<all>");
        }
        let mut parts: Vec<String> = self
            .match_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        for r in &self.expressions {
            let list = |v: &BTreeSet<String>| v.iter().cloned().collect::<Vec<_>>().join(",");
            parts.push(match &r.op {
                Op::In(v) => format!("{} in ({})", r.key, list(v)),
                Op::NotIn(v) => format!("{} notin ({})", r.key, list(v)),
                Op::Exists => r.key.clone(),
                Op::DoesNotExist => format!("!{}", r.key),
            });
        }
        f.write_str(&parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|v| v.to_string()).collect()),
        }
    }

    #[test]
    fn operators_as_kubernetes_defines_them() {
        let s = Selector::from_k8s(&LabelSelector {
            match_labels: Some(labels(&[("app", "web")])),
            match_expressions: Some(vec![
                expr("tier", "In", &["a", "b"]),
                expr("env", "NotIn", &["prod"]),
                expr("team", "Exists", &[]),
                expr("legacy", "DoesNotExist", &[]),
            ]),
        })
        .unwrap();
        let yes = labels(&[("app", "web"), ("tier", "a"), ("team", "x")]);
        assert!(s.matches(&yes));
        // NotIn holds when the label is absent, fails on a listed value.
        let mut l = yes.clone();
        l.insert("env".into(), "dev".into());
        assert!(s.matches(&l));
        l.insert("env".into(), "prod".into());
        assert!(!s.matches(&l));
        for (k, v) in [("tier", "c"), ("app", "db"), ("legacy", "")] {
            let mut l = yes.clone();
            l.insert(k.into(), v.into());
            assert!(!s.matches(&l), "{k}={v}");
        }
        let mut l = yes.clone();
        l.remove("team");
        assert!(!s.matches(&l));
        assert_eq!(
            s.to_string(),
            "app=web,tier in (a,b),env notin (prod),team,!legacy"
        );
        assert!(Selector::everything().matches(&Labels::new()));
    }

    #[test]
    fn invalid_expressions_are_refused() {
        for e in [
            expr("a", "In", &[]),
            expr("a", "NotIn", &[]),
            expr("a", "Exists", &["x"]),
            expr("a", "DoesNotExist", &["x"]),
            expr("a", "Gt", &["1"]),
        ] {
            let s = LabelSelector {
                match_labels: None,
                match_expressions: Some(vec![e.clone()]),
            };
            assert!(
                matches!(Selector::from_k8s(&s), Err(Error::Selector(_))),
                "{e:?}"
            );
        }
    }
}
