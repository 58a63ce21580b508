//! The life of an analysis: its status and its priority in the queue.

use serde::{Deserialize, Serialize};

/// Where an analysis is in its life. Terminal states never change again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        [
            Self::Queued,
            Self::Running,
            Self::Succeeded,
            Self::Failed,
            Self::Cancelled,
        ]
        .into_iter()
        .find(|s| s.as_str() == raw)
    }
}

/// `stat` analyses are claimed before any `routine` one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    #[default]
    Routine,
    Stat,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Routine => "routine",
            Self::Stat => "stat",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "routine" => Some(Self::Routine),
            "stat" => Some(Self::Stat),
            _ => None,
        }
    }

    /// The queue orders on this: lower is claimed first.
    pub fn queue_rank(self) -> i16 {
        match self {
            Self::Stat => 0,
            Self::Routine => 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trips_through_its_database_spelling() {
        for s in [
            Status::Queued,
            Status::Running,
            Status::Succeeded,
            Status::Failed,
            Status::Cancelled,
        ] {
            assert_eq!(Status::parse(s.as_str()), Some(s));
        }
        assert_eq!(Status::parse("done"), None);
    }

    #[test]
    fn stat_is_claimed_before_routine() {
        assert!(Priority::Stat.queue_rank() < Priority::Routine.queue_rank());
    }
}
