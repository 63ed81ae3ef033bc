//! `secrets/<name>.toml` of the config repository: one secret, sealed to
//! each minion that may read it, and to the operators who sealed it (so
//! that `provis secret reseal` can open it again when members change).
//!
//! ```toml
//! # Written by `provis secret seal`; commit it. Only the recipients can open it.
//! roles = ["web"]          # members: minions in these roles (sub-roles included)
//! minions = []             # and these minions
//!
//! [sealed.m1]
//! key = "x25519:…"         # the recipient's key it was sealed to
//! value = "base64…"
//!
//! [escrow."ed25519:…"]     # an operator's copy, sealed to that operator
//! key = "x25519:…"
//! value = "base64…"
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::subject::RoleName;

/// The folder of a config repository that holds secrets.
pub const SECRETS_DIR: &str = "secrets";

/// A secret as it sits in git: sealed copies only, never the value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealedSecret {
    /// Minions in these roles (or their sub-roles) are members.
    #[serde(default)]
    pub roles: Vec<String>,
    /// These minions are members too.
    #[serde(default)]
    pub minions: Vec<String>,
    /// Minion id → the value sealed to it.
    #[serde(default)]
    pub sealed: BTreeMap<String, SealedCopy>,
    /// Operator's public key → the value sealed to that operator.
    #[serde(default)]
    pub escrow: BTreeMap<String, SealedCopy>,
}

/// One sealed copy of a secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealedCopy {
    /// The recipient's encryption key (`x25519:<hex>`) it was sealed to.
    pub key: String,
    /// The sealed box, base64.
    pub value: String,
}

/// A minion as membership sees it: its id, roles and published key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate<'a> {
    pub id: &'a str,
    pub roles: &'a [RoleName],
    pub encryption_key: Option<&'a str>,
}

impl SealedSecret {
    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// The file's text, with a header that says what it is.
    pub fn to_toml(&self, name: &str) -> Result<String, toml::ser::Error> {
        Ok(format!(
            "# Secret {name:?}: written by `provis secret seal`. Only its recipients can open it;\n# `provis secret reseal` seals it again when members change.\n{}",
            toml::to_string(self)?
        ))
    }

    /// Whether a minion with `id` and `roles` may read this secret.
    pub fn is_member(&self, id: &str, roles: &[RoleName]) -> bool {
        self.minions.iter().any(|m| m == id)
            || self.roles.iter().any(|granted| {
                granted
                    .parse::<RoleName>()
                    .is_ok_and(|granted| roles.iter().any(|own| own.is_within(&granted)))
            })
    }

    /// The copy sealed to `candidate` if it is a member and the copy was
    /// sealed to the key it publishes now.
    pub fn copy_for(&self, candidate: &Candidate<'_>) -> Option<&SealedCopy> {
        if !self.is_member(candidate.id, candidate.roles) {
            return None;
        }
        let copy = self.sealed.get(candidate.id)?;
        (Some(copy.key.as_str()) == candidate.encryption_key).then_some(copy)
    }

    /// Members among `candidates` without a copy they can open, each with why.
    pub fn missing<'a>(&self, candidates: impl IntoIterator<Item = Candidate<'a>>) -> Vec<String> {
        candidates
            .into_iter()
            .filter(|c| self.is_member(c.id, c.roles))
            .filter_map(|c| match (self.sealed.get(c.id), c.encryption_key) {
                (_, None) => Some(format!("{} (publishes no encryption key)", c.id)),
                (None, Some(_)) => Some(c.id.to_owned()),
                (Some(copy), Some(key)) if copy.key != key => {
                    Some(format!("{} (sealed to an older key)", c.id))
                }
                _ => None,
            })
            .collect()
    }
}

/// True when `name` can name a secret: `[a-z0-9_-]`, 1 to 64 characters.
pub fn is_secret_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_and_what_they_miss() {
        let secret = SealedSecret {
            roles: vec!["web".into()],
            minions: vec!["ops1".into()],
            sealed: BTreeMap::from([(
                "m1".to_owned(),
                SealedCopy {
                    key: "x25519:aa".into(),
                    value: "box".into(),
                },
            )]),
            ..SealedSecret::default()
        };
        let web_eu: Vec<RoleName> = vec!["web.eu".parse().unwrap()];
        let db: Vec<RoleName> = vec!["db".parse().unwrap()];
        let candidate = |id, roles, key| Candidate {
            id,
            roles,
            encryption_key: key,
        };
        assert!(secret.is_member("m1", &web_eu));
        assert!(secret.is_member("ops1", &db));
        assert!(!secret.is_member("d1", &db));
        assert!(
            secret
                .copy_for(&candidate("m1", &web_eu, Some("x25519:aa")))
                .is_some()
        );
        assert!(
            secret
                .copy_for(&candidate("m1", &web_eu, Some("x25519:bb")))
                .is_none()
        );
        assert!(
            secret
                .copy_for(&candidate("m1", &db, Some("x25519:aa")))
                .is_none()
        );
        let missing = secret.missing([
            candidate("m1", &web_eu, Some("x25519:aa")),
            candidate("m2", &web_eu, Some("x25519:cc")),
            candidate("m3", &web_eu, None),
            candidate("d1", &db, Some("x25519:dd")),
        ]);
        assert_eq!(missing, ["m2", "m3 (publishes no encryption key)"]);
        let text = secret.to_toml("db").unwrap();
        assert_eq!(SealedSecret::parse(&text).unwrap(), secret);
    }
}
