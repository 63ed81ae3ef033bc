//! NATS subjects of a fleet, and the checked names they are built from.
//!
//! A subject is never built from unchecked input: minion ids, role tokens and
//! the fleet prefix are validated here once (`[a-z0-9_-]`, bounded length) and
//! carried as types afterwards, so a caller cannot smuggle `*`, `>` or `.` into
//! a subject another minion listens on.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest minion id, role token or prefix token we accept.
pub const MAX_TOKEN_LEN: usize = 64;
/// Deepest role hierarchy we accept (`web.eu.paris` is three).
pub const MAX_ROLE_DEPTH: usize = 8;
/// The subject prefix when none is configured.
pub const DEFAULT_PREFIX: &str = "provis";

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error("{what} {value:?} is longer than {MAX_TOKEN_LEN} characters")]
    TooLong { what: &'static str, value: String },
    #[error(
        "{what} {value:?} may only hold lowercase letters, digits, '-' and '_' (found {found:?})"
    )]
    BadCharacter {
        what: &'static str,
        value: String,
        found: char,
    },
    #[error("role {value:?} has more than {MAX_ROLE_DEPTH} levels")]
    TooDeep { value: String },
    #[error("target {value:?} is not one of 'all', 'role.<role>[.<sub-role>…]' or 'minion.<id>'")]
    BadTarget { value: String },
}

fn check_token(what: &'static str, value: &str) -> Result<(), NameError> {
    if value.is_empty() {
        return Err(NameError::Empty { what });
    }
    if value.len() > MAX_TOKEN_LEN {
        return Err(NameError::TooLong {
            what,
            value: value.to_owned(),
        });
    }
    if let Some(found) = value
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '_'))
    {
        return Err(NameError::BadCharacter {
            what,
            value: value.to_owned(),
            found,
        });
    }
    Ok(())
}

macro_rules! checked_token {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// The checked name.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = NameError;
            fn from_str(value: &str) -> Result<Self, NameError> {
                check_token($what, value)?;
                Ok(Self(value.to_owned()))
            }
        }

        impl TryFrom<String> for $name {
            type Error = NameError;
            fn try_from(value: String) -> Result<Self, NameError> {
                check_token($what, &value)?;
                Ok(Self(value))
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(&self.0)
            }
        }
    };
}

checked_token!(
    /// A minion's id: one subject token, unique in the fleet.
    MinionId,
    "minion id"
);
checked_token!(
    /// The first token of every subject of a fleet; several fleets can share a NATS
    /// server under different prefixes.
    Prefix,
    "subject prefix"
);

impl Default for Prefix {
    fn default() -> Self {
        Self(DEFAULT_PREFIX.to_owned())
    }
}

/// A role such as `web` or `web.eu`: dot-separated tokens, each checked. A
/// member of `web.eu` is also a member of `web`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RoleName(String);

impl RoleName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `web.eu.paris` → `web`, `web.eu`, `web.eu.paris`: every role whose calls a
    /// member of this role must receive.
    pub fn ancestors_and_self(&self) -> impl Iterator<Item = &str> {
        self.0
            .match_indices('.')
            .map(|(at, _)| &self.0[..at])
            .chain(std::iter::once(self.0.as_str()))
    }

    /// True when a member of `self` is addressed by a call to `role`.
    pub fn is_within(&self, role: &RoleName) -> bool {
        self.0 == role.0
            || (self.0.starts_with(&role.0) && self.0.as_bytes().get(role.0.len()) == Some(&b'.'))
    }
}

impl FromStr for RoleName {
    type Err = NameError;
    fn from_str(value: &str) -> Result<Self, NameError> {
        if value.is_empty() {
            return Err(NameError::Empty { what: "role" });
        }
        let mut depth = 0;
        for token in value.split('.') {
            check_token("role token", token)?;
            depth += 1;
        }
        if depth > MAX_ROLE_DEPTH {
            return Err(NameError::TooDeep {
                value: value.to_owned(),
            });
        }
        Ok(Self(value.to_owned()))
    }
}

impl TryFrom<String> for RoleName {
    type Error = NameError;
    fn try_from(value: String) -> Result<Self, NameError> {
        value.parse()
    }
}

impl From<RoleName> for String {
    fn from(value: RoleName) -> String {
        value.0
    }
}

/// A role name orders as its text does, so maps keyed by role are looked
/// up by `&str` (a role's ancestors are text slices of it).
impl std::borrow::Borrow<str> for RoleName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RoleName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

/// Who a call is addressed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallTarget {
    /// Every minion of the fleet.
    All,
    /// Every member of a role or of one of its sub-roles.
    Role(RoleName),
    /// These minions, by id.
    Minions(Vec<MinionId>),
}

impl CallTarget {
    /// Parses the `--subject` form: `all`, `role.web.eu`, `minion.m1` or
    /// `minion.m1,m2,…`.
    pub fn parse_subject(value: &str) -> Result<Self, NameError> {
        let bad = || NameError::BadTarget {
            value: value.to_owned(),
        };
        if value == "all" {
            return Ok(Self::All);
        }
        match value.split_once('.') {
            Some(("role", role)) => Ok(Self::Role(role.parse()?)),
            Some(("minion", ids)) => Ok(Self::Minions(
                ids.split(',').map(str::parse).collect::<Result<_, _>>()?,
            )),
            _ => Err(bad()),
        }
    }

    /// The form `parse_subject` reads, for logs and envelopes.
    pub fn describe(&self) -> String {
        match self {
            Self::All => "all".to_owned(),
            Self::Role(role) => format!("role.{role}"),
            Self::Minions(ids) => {
                let ids: Vec<&str> = ids.iter().map(MinionId::as_str).collect();
                format!("minion.{}", ids.join(","))
            }
        }
    }
}

/// Builds every subject of one fleet from its prefix.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subjects {
    prefix: Prefix,
}

impl Subjects {
    pub fn new(prefix: Prefix) -> Self {
        Self { prefix }
    }

    pub fn prefix(&self) -> &Prefix {
        &self.prefix
    }

    /// `<prefix>.minion.<id>.call`
    pub fn minion_call(&self, id: &MinionId) -> String {
        format!("{}.minion.{id}.call", self.prefix)
    }

    /// `<prefix>.all.call`
    pub fn all_call(&self) -> String {
        format!("{}.all.call", self.prefix)
    }

    /// `<prefix>.role.<role>.call`
    pub fn role_call(&self, role: &str) -> String {
        format!("{}.role.{role}.call", self.prefix)
    }

    /// The subjects a call to `target` is published on: one per target, never
    /// one per member of a role.
    pub fn call_subjects(&self, target: &CallTarget) -> Vec<String> {
        match target {
            CallTarget::All => vec![self.all_call()],
            CallTarget::Role(role) => vec![self.role_call(role.as_str())],
            CallTarget::Minions(ids) => ids.iter().map(|id| self.minion_call(id)).collect(),
        }
    }

    /// Every subject a minion with these roles listens on for calls: its own,
    /// the fleet-wide one, and each role with all of its ancestors.
    pub fn minion_listen_subjects(&self, id: &MinionId, roles: &[RoleName]) -> Vec<String> {
        let mut subjects = vec![self.minion_call(id), self.all_call()];
        for role in roles {
            for role in role.ancestors_and_self() {
                let subject = self.role_call(role);
                if !subjects.contains(&subject) {
                    subjects.push(subject);
                }
            }
        }
        subjects
    }

    /// `<prefix>.heartbeat.<id>`: a minion's heartbeats (core NATS, not stored).
    pub fn heartbeat(&self, id: &MinionId) -> String {
        format!("{}.heartbeat.{id}", self.prefix)
    }

    /// `<prefix>.job.<job>.<part>`: a job's `request`, `summary`, or
    /// `result.<minion>` (see [`crate::jobs`]).
    pub fn job(&self, job: &str, part: &str) -> String {
        format!("{}.job.{job}.{part}", self.prefix)
    }

    /// `<prefix>.state.<id>`
    pub fn state(&self, id: &MinionId) -> String {
        format!("{}.state.{id}", self.prefix)
    }

    /// `<prefix>.event.<source>.<kind>`; `kind` is one or more dot-separated tokens.
    pub fn event(&self, source: &str, kind: &str) -> String {
        format!("{}.event.{source}.{kind}", self.prefix)
    }

    /// `<prefix>.master.<what>`
    pub fn master(&self, what: &str) -> String {
        format!("{}.master.{what}", self.prefix)
    }

    /// Filters a stream or consumer uses, e.g. `<prefix>.event.>`.
    pub fn wildcard(&self, area: &str) -> String {
        format!("{}.{area}.>", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_refuse_subject_syntax() {
        for bad in ["", "a.b", "*", ">", "M1", "a b", "ä", &"x".repeat(65)] {
            assert!(bad.parse::<MinionId>().is_err(), "{bad:?} accepted");
        }
        assert!("web-1_a".parse::<MinionId>().is_ok());
        assert!("web..eu".parse::<RoleName>().is_err());
        assert!("web.*".parse::<RoleName>().is_err());
        assert!("web.eu".parse::<RoleName>().is_ok());
    }

    #[test]
    fn a_sub_role_listens_on_its_ancestors() {
        let subjects = Subjects::default();
        let id: MinionId = "m1".parse().unwrap();
        let roles = vec!["web.eu.paris".parse().unwrap(), "web.us".parse().unwrap()];
        assert_eq!(
            subjects.minion_listen_subjects(&id, &roles),
            [
                "provis.minion.m1.call",
                "provis.all.call",
                "provis.role.web.call",
                "provis.role.web.eu.call",
                "provis.role.web.eu.paris.call",
                "provis.role.web.us.call",
            ]
        );
    }

    #[test]
    fn role_membership_is_by_whole_tokens() {
        let web: RoleName = "web".parse().unwrap();
        assert!("web.eu".parse::<RoleName>().unwrap().is_within(&web));
        assert!(web.is_within(&web));
        assert!(!"webby".parse::<RoleName>().unwrap().is_within(&web));
        assert!(!web.is_within(&"web.eu".parse().unwrap()));
    }

    #[test]
    fn targets_parse_from_the_subject_flag() {
        assert_eq!(CallTarget::parse_subject("all").unwrap(), CallTarget::All);
        assert_eq!(
            CallTarget::parse_subject("role.web.eu").unwrap(),
            CallTarget::Role("web.eu".parse().unwrap())
        );
        assert!(CallTarget::parse_subject("web").is_err());
        assert!(CallTarget::parse_subject("minion.m1.call").is_err());
    }
}
