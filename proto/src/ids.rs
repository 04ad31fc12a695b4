//! Typed ids of the wire contract (`RunId`, `JobId`, `WorkerId`, `Attempt`)
//! and their conversions to and from the strings and numbers on the wire.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Why a wire string or number is not a valid id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdParseError {
    /// The field was empty (or zero, for an attempt).
    #[error("missing {kind}")]
    Missing {
        /// What was expected, e.g. "run id".
        kind: &'static str,
    },
    /// The field held something else than an id.
    #[error("invalid {kind} \"{input}\": {reason}")]
    Invalid {
        /// What was expected, e.g. "run id".
        kind: &'static str,
        /// The offending input, verbatim.
        input: String,
        /// What is wrong with it.
        reason: String,
    },
}

macro_rules! uuid_id {
    ($(#[$meta:meta])* $name:ident, $kind:literal) => {
        $(#[$meta])*
        ///
        /// On the wire it is a lowercase hyphenated UUID string; new ids are
        /// UUIDv7, so they sort by creation time.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(Uuid);

        impl $name {
            /// What this id is called in messages.
            pub const KIND: &'static str = $kind;

            /// A fresh, time-ordered id (UUIDv7).
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }

            /// Wraps an existing UUID (e.g. read from a database column).
            pub const fn from_uuid(uuid: Uuid) -> Self {
                Self(uuid)
            }

            /// The UUID inside.
            pub const fn as_uuid(&self) -> &Uuid {
                &self.0
            }

            /// Parses the id from its wire string, naming the id in the error.
            pub fn parse_wire(input: &str) -> Result<Self, IdParseError> {
                let trimmed = input.trim();
                if trimmed.is_empty() {
                    return Err(IdParseError::Missing { kind: $kind });
                }
                let uuid = Uuid::try_parse(trimmed).map_err(|err| IdParseError::Invalid {
                    kind: $kind,
                    input: input.to_owned(),
                    reason: format!("expected a UUID such as 0190f5c2-7a3e-7b1c-9d2a-3c4b5d6e7f80 ({err})"),
                })?;
                if uuid.is_nil() {
                    return Err(IdParseError::Invalid {
                        kind: $kind,
                        input: input.to_owned(),
                        reason: "the nil UUID is not an id".to_owned(),
                    });
                }
                Ok(Self(uuid))
            }

            /// The wire string: the lowercase hyphenated UUID.
            pub fn to_wire(&self) -> String {
                self.to_string()
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0.hyphenated(), f)
            }
        }

        impl FromStr for $name {
            type Err = IdParseError;

            fn from_str(input: &str) -> Result<Self, IdParseError> {
                Self::parse_wire(input)
            }
        }

        impl TryFrom<&str> for $name {
            type Error = IdParseError;

            fn try_from(input: &str) -> Result<Self, IdParseError> {
                Self::parse_wire(input)
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdParseError;

            fn try_from(input: String) -> Result<Self, IdParseError> {
                Self::parse_wire(&input)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.to_string()
            }
        }

        impl From<Uuid> for $name {
            fn from(uuid: Uuid) -> Self {
                Self(uuid)
            }
        }

        impl From<$name> for Uuid {
            fn from(id: $name) -> Uuid {
                id.0
            }
        }
    };
}

uuid_id!(
    /// Id of a run: one submitted experiment, split into jobs.
    RunId,
    "run id"
);
uuid_id!(
    /// Id of a job: up to shard-size prompts of one prompt set in one mode.
    JobId,
    "job id"
);
uuid_id!(
    /// Id of a worker process, chosen by the worker when it starts.
    WorkerId,
    "worker id"
);

/// The attempt number of a job's lease, starting at 1; each claim bumps it.
///
/// Together with the [`JobId`] it fences every state change of a job: only
/// the attempt that currently holds the lease may heartbeat, complete or fail
/// it. On the wire it is a `uint32` where 0 means "not set".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct Attempt(u32);

impl Attempt {
    /// The first attempt of a job.
    pub const FIRST: Attempt = Attempt(1);
    /// What an attempt is called in messages.
    pub const KIND: &'static str = "attempt";

    /// An attempt number; `None` for 0, which is not an attempt.
    pub const fn new(number: u32) -> Option<Self> {
        if number == 0 {
            None
        } else {
            Some(Self(number))
        }
    }

    /// The attempt number (at least 1).
    pub const fn get(self) -> u32 {
        self.0
    }

    /// The attempt after this one, as handed out by the next claim.
    pub const fn next(self) -> Self {
        Self(self.0.saturating_add(1))
    }

    /// Checks a wire value: 0 is reported as a missing attempt.
    pub fn from_wire(number: u32) -> Result<Self, IdParseError> {
        Self::new(number).ok_or(IdParseError::Missing { kind: Self::KIND })
    }
}

impl fmt::Display for Attempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl FromStr for Attempt {
    type Err = IdParseError;

    fn from_str(input: &str) -> Result<Self, IdParseError> {
        let trimmed = input.trim();
        if trimmed.is_empty() {
            return Err(IdParseError::Missing { kind: Self::KIND });
        }
        let number = trimmed
            .parse::<u32>()
            .map_err(|err| IdParseError::Invalid {
                kind: Self::KIND,
                input: input.to_owned(),
                reason: format!("expected a positive whole number ({err})"),
            })?;
        Self::new(number).ok_or_else(|| IdParseError::Invalid {
            kind: Self::KIND,
            input: input.to_owned(),
            reason: "attempts start at 1".to_owned(),
        })
    }
}

impl TryFrom<u32> for Attempt {
    type Error = IdParseError;

    fn try_from(number: u32) -> Result<Self, IdParseError> {
        Self::from_wire(number)
    }
}

impl From<Attempt> for u32 {
    fn from(attempt: Attempt) -> u32 {
        attempt.0
    }
}

/// The fencing token of a job state change: which job, which attempt of its
/// lease, and which worker claims to hold it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fence {
    /// The job.
    pub job_id: JobId,
    /// The attempt the caller's lease is for.
    pub attempt: Attempt,
    /// The worker that claims the lease.
    pub worker_id: WorkerId,
}

impl Fence {
    /// Parses the three wire fields of a fenced request.
    pub fn from_wire(job_id: &str, attempt: u32, worker_id: &str) -> Result<Self, IdParseError> {
        Ok(Self {
            job_id: JobId::parse_wire(job_id)?,
            attempt: Attempt::from_wire(attempt)?,
            worker_id: WorkerId::parse_wire(worker_id)?,
        })
    }
}

impl fmt::Display for Fence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "job {} attempt {} (worker {})",
            self.job_id, self.attempt, self.worker_id
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_ids_round_trip_through_wire_strings() {
        let run = RunId::new();
        let wire = run.to_wire();
        assert_eq!(wire.len(), 36);
        assert_eq!(wire, wire.to_lowercase());
        assert_eq!(wire.parse::<RunId>().unwrap(), run);
        assert_eq!(RunId::try_from(wire.clone()).unwrap(), run);
        assert_eq!(String::from(run), wire);

        let job = JobId::from_uuid(Uuid::new_v4());
        assert_eq!(JobId::parse_wire(&job.to_string()).unwrap(), job);
        assert_eq!(Uuid::from(job), *job.as_uuid());

        let worker = WorkerId::from(Uuid::new_v4());
        assert_eq!(
            WorkerId::try_from(worker.to_wire().as_str()).unwrap(),
            worker
        );
    }

    #[test]
    fn uuid_ids_accept_other_uuid_spellings_and_normalise_them() {
        let id: RunId = " 0190F5C2-7A3E-7B1C-9D2A-3C4B5D6E7F80 ".parse().unwrap();
        assert_eq!(id.to_string(), "0190f5c2-7a3e-7b1c-9d2a-3c4b5d6e7f80");
        let simple: RunId = "0190f5c27a3e7b1c9d2a3c4b5d6e7f80".parse().unwrap();
        assert_eq!(simple, id);
    }

    #[test]
    fn new_ids_are_time_ordered() {
        let first = JobId::new();
        let second = JobId::new();
        assert!(first < second, "{first} should sort before {second}");
    }

    #[test]
    fn uuid_id_parse_errors_name_the_id_and_the_input() {
        assert_eq!(
            "".parse::<RunId>().unwrap_err(),
            IdParseError::Missing { kind: "run id" }
        );
        assert_eq!(
            "  ".parse::<JobId>().unwrap_err().to_string(),
            "missing job id"
        );

        let err = "not-a-uuid".parse::<WorkerId>().unwrap_err();
        let message = err.to_string();
        assert!(
            message.starts_with("invalid worker id \"not-a-uuid\": expected a UUID such as "),
            "{message}"
        );
        assert!(matches!(
            err,
            IdParseError::Invalid {
                kind: "worker id",
                ..
            }
        ));

        let nil = Uuid::nil().to_string();
        assert_eq!(
            nil.parse::<RunId>().unwrap_err().to_string(),
            format!("invalid run id \"{nil}\": the nil UUID is not an id")
        );
    }

    #[test]
    fn attempts_round_trip_and_reject_zero() {
        assert_eq!(Attempt::from_wire(1).unwrap(), Attempt::FIRST);
        assert_eq!(Attempt::FIRST.next().get(), 2);
        assert_eq!(u32::from(Attempt::try_from(7).unwrap()), 7);
        assert_eq!("3".parse::<Attempt>().unwrap().to_string(), "3");
        assert_eq!(Attempt::new(0), None);
        assert_eq!(
            Attempt::from_wire(0).unwrap_err().to_string(),
            "missing attempt"
        );
        assert_eq!(
            "0".parse::<Attempt>().unwrap_err().to_string(),
            "invalid attempt \"0\": attempts start at 1"
        );
        let message = "-1".parse::<Attempt>().unwrap_err().to_string();
        assert!(
            message.starts_with("invalid attempt \"-1\": expected a positive whole number"),
            "{message}"
        );
    }

    #[test]
    fn ids_serialize_as_wire_strings_and_numbers() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct Row {
            run: RunId,
            attempt: Attempt,
        }
        let row = Row {
            run: RunId::new(),
            attempt: Attempt::FIRST,
        };
        let json = serde_json::to_string(&row).unwrap();
        assert_eq!(json, format!("{{\"run\":\"{}\",\"attempt\":1}}", row.run));
        assert_eq!(serde_json::from_str::<Row>(&json).unwrap(), row);

        let bad = serde_json::from_str::<Row>(r#"{"run":"x","attempt":1}"#).unwrap_err();
        assert!(bad.to_string().contains("invalid run id \"x\""), "{bad}");
        let zero = format!("{{\"run\":\"{}\",\"attempt\":0}}", row.run);
        let bad = serde_json::from_str::<Row>(&zero).unwrap_err();
        assert!(bad.to_string().contains("missing attempt"), "{bad}");
    }

    #[test]
    fn fences_parse_all_three_fields() {
        let (job, worker) = (JobId::new(), WorkerId::new());
        let fence = Fence::from_wire(&job.to_wire(), 2, &worker.to_wire()).unwrap();
        assert_eq!(fence.job_id, job);
        assert_eq!(fence.attempt.get(), 2);
        assert_eq!(fence.worker_id, worker);
        assert_eq!(
            fence.to_string(),
            format!("job {job} attempt 2 (worker {worker})")
        );
        assert_eq!(
            Fence::from_wire(&job.to_wire(), 0, &worker.to_wire()).unwrap_err(),
            IdParseError::Missing { kind: "attempt" }
        );
        assert_eq!(
            Fence::from_wire(&job.to_wire(), 1, "").unwrap_err(),
            IdParseError::Missing { kind: "worker id" }
        );
    }
}
