//! The secrets a service was given (those its manifest grants, opened by
//! the minion) and the redaction that keeps their values out of what
//! leaves the sandbox: call results and errors, events, log lines and
//! state all carry `[secret NAME]` where a value was. Values shorter than
//! [`MIN_REDACTED_LEN`] characters are not searched for (they would match
//! ordinary text); secrets are expected to be longer.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Values shorter than this are not redacted.
pub const MIN_REDACTED_LEN: usize = 4;

/// Secret name → its value, or why this minion has none.
#[derive(Clone, Default)]
pub struct ServiceSecrets(Arc<BTreeMap<String, Result<String, String>>>);

impl std::fmt::Debug for ServiceSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Names only: a value never reaches a log through Debug.
        f.debug_set().entries(self.0.keys()).finish()
    }
}

impl ServiceSecrets {
    pub fn new(values: BTreeMap<String, Result<String, String>>) -> Self {
        Self(Arc::new(values))
    }

    /// The value of `name`, or why there is none; `None` when the service
    /// was given nothing under that name.
    pub fn get(&self, name: &str) -> Option<&Result<String, String>> {
        self.0.get(name)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `text` with each secret value replaced by `[secret NAME]`.
    pub fn redact<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let mut out = Cow::Borrowed(text);
        for (name, value) in self.0.iter() {
            if let Ok(value) = value
                && value.chars().count() >= MIN_REDACTED_LEN
                && out.contains(value.as_str())
            {
                out = Cow::Owned(out.replace(value.as_str(), &format!("[secret {name}]")));
            }
        }
        out
    }

    /// `value` with every string (keys included) redacted.
    pub fn redact_json(&self, value: serde_json::Value) -> serde_json::Value {
        use serde_json::Value;
        if self.0.is_empty() {
            return value;
        }
        match value {
            Value::String(text) => Value::String(self.redact(&text).into_owned()),
            Value::Array(items) => {
                Value::Array(items.into_iter().map(|v| self.redact_json(v)).collect())
            }
            Value::Object(entries) => Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (self.redact(&k).into_owned(), self.redact_json(v)))
                    .collect(),
            ),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_replaced_wherever_they_appear() {
        let secrets = ServiceSecrets::new(BTreeMap::from([
            ("db".to_owned(), Ok("hunter22".to_owned())),
            ("short".to_owned(), Ok("ab".to_owned())),
            ("absent".to_owned(), Err("not sealed here".to_owned())),
        ]));
        assert_eq!(secrets.redact("pw=hunter22;"), "pw=[secret db];");
        assert_eq!(secrets.redact("ab stays"), "ab stays");
        let json = serde_json::json!({"a": ["xhunter22x"], "hunter22": 1});
        assert_eq!(
            secrets.redact_json(json),
            serde_json::json!({"a": ["x[secret db]x"], "[secret db]": 1})
        );
        assert_eq!(format!("{secrets:?}"), r#"{"absent", "db", "short"}"#);
    }
}
