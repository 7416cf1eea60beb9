//! Status conditions on Margay's resources (the shape of
//! `metav1.Condition`) and the one rule for their transition time: it
//! moves only when the status changes, whatever else changes with it.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A status condition (the shape of `metav1.Condition`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// The condition's type, e.g. `Ready`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// One CamelCase word saying why.
    pub reason: String,
    /// What a person should know or do (never empty: the v1.20 apiserver
    /// reads an empty string here as null).
    pub message: String,
    /// When `status` last changed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
}

impl Condition {
    /// A condition with no transition time yet (see [`Condition::since`]).
    pub fn new(type_: &str, status: bool, reason: &str, message: impl Into<String>) -> Self {
        Self {
            type_: type_.to_string(),
            status: if status { "True" } else { "False" }.to_string(),
            reason: reason.to_string(),
            message: message.into(),
            last_transition_time: None,
        }
    }

    /// This condition with its transition time: `old`'s when the status did
    /// not change, now when it did (or there was none).
    pub fn since(mut self, old: Option<&Condition>) -> Self {
        self.last_transition_time = Some(transition(
            old.map(|o| o.status.as_str()),
            old.and_then(|o| o.last_transition_time.clone()),
            &self.status,
            now_rfc3339,
        ));
        self
    }

    /// Whether `other` says the same (status, reason and message): nothing
    /// worth writing.
    pub fn same(&self, other: Option<&Condition>) -> bool {
        other.is_some_and(|o| {
            self.status == o.status && self.reason == o.reason && self.message == o.message
        })
    }
}

/// The condition of `type_` among `conds`.
pub fn find<'a>(conds: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conds.iter().find(|c| c.type_ == type_)
}

/// The transition time of a condition now `status`, that was `old_status`
/// since `old_time`: kept when the status is the same, else `now()`. Any
/// condition type (Margay's resources', a Node's) follows this one rule.
pub fn transition<T>(
    old_status: Option<&str>,
    old_time: Option<T>,
    status: &str,
    now: impl FnOnce() -> T,
) -> T {
    match (old_status, old_time) {
        (Some(s), Some(t)) if s == status => t,
        _ => now(),
    }
}

/// The current time in RFC 3339, to the second.
pub fn now_rfc3339() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .unwrap_or(jiff::Timestamp::now())
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_transition_time_moves_only_with_the_status() {
        let mut first = Condition::new("Valid", false, "Invalid", "bad").since(None);
        first.last_transition_time = Some("2026-01-01T00:00:00Z".into());
        let again = Condition::new("Valid", false, "Invalid", "worse").since(Some(&first));
        assert_eq!(again.last_transition_time, first.last_transition_time);
        assert!(!again.same(Some(&first)), "the message changed");
        let fixed = Condition::new("Valid", true, "Valid", "in use").since(Some(&first));
        assert_ne!(fixed.last_transition_time, first.last_transition_time);
        assert!(fixed.same(Some(&fixed.clone())));
        assert!(!fixed.same(None));
        assert_eq!(find(&[first.clone()], "Valid"), Some(&first));
        assert_eq!(transition(Some("True"), Some(1), "True", || 2), 1);
        assert_eq!(transition(Some("False"), Some(1), "True", || 2), 2);
        assert_eq!(transition(None, None::<u8>, "True", || 2), 2);
    }
}
