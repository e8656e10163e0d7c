//! The query ledger (`spec/enclave-protocol.md` §7): the licence state the
//! enclave seals to itself, and the rules that spend and raise its budget.
//!
//! How many queries were *used* is never stored here: it is the platform's
//! monotonic counter, which only goes up. The sealed state holds only what the
//! server granted (the grant, the total, the expiry, the last top-up applied),
//! so restoring an older copy of it can lower the budget but never give back
//! queries.

use capsule_attest::Attester;
use capsule_format::{Grant, INSTANCE_ID_LEN, Policy, TopUp};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::error::Error;

/// Associated data of the sealed state, followed by the instance id (§7.1).
const STATE_AAD: &[u8] = b"mlcapsule/v1 state";
/// The version of the sealed state's JSON.
const STATE_VERSION: u32 = 1;

/// What the enclave knows about its licence, sealed between runs.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Ledger {
    /// Always [`STATE_VERSION`].
    version: u32,
    /// The grant as the server released it (holds the model key).
    pub grant: Grant,
    /// The last top-up sequence number applied, 0 for none.
    pub topup_seq: u64,
    /// Queries granted in total: the grant's, then the last top-up's.
    pub total: u64,
    /// Last day the model may run (UTC), from the grant or the last top-up.
    pub expires: Option<String>,
}

impl Ledger {
    /// The state right after provisioning.
    pub fn new(grant: Grant) -> Ledger {
        Ledger {
            version: STATE_VERSION,
            total: grant.queries,
            expires: grant.expires.clone(),
            topup_seq: 0,
            grant,
        }
    }

    /// Seals the state to this platform, binary and instance (§7.1).
    pub fn seal(
        &self,
        attester: &dyn Attester,
        instance_id: &[u8; INSTANCE_ID_LEN],
    ) -> Result<Vec<u8>, Error> {
        // Serialise into a buffer of the exact size, so that no reallocation
        // leaves a copy of the model key behind.
        let mut counter = ByteCount(0);
        serde_json::to_writer(&mut counter, self).map_err(|e| Error::Internal {
            reason: format!("state does not serialise: {e}"),
        })?;
        let mut plaintext = Zeroizing::new(Vec::with_capacity(counter.0));
        serde_json::to_writer(&mut *plaintext, self).map_err(|e| Error::Internal {
            reason: format!("state does not serialise: {e}"),
        })?;
        attester
            .seal(&aad(instance_id), &plaintext)
            .map_err(|e| Error::Platform {
                reason: e.to_string(),
            })
    }

    /// Opens a state sealed by [`Ledger::seal`] for this instance.
    pub fn unseal(
        attester: &dyn Attester,
        instance_id: &[u8; INSTANCE_ID_LEN],
        sealed: &[u8],
    ) -> Result<Ledger, Error> {
        let plaintext = attester
            .unseal(&aad(instance_id), sealed)
            .map_err(|_| Error::StateRejected)?;
        let ledger: Ledger =
            serde_json::from_slice(&plaintext).map_err(|_| Error::StateRejected)?;
        if ledger.version != STATE_VERSION || ledger.grant.instance_id != *instance_id {
            return Err(Error::StateRejected);
        }
        Ok(ledger)
    }

    /// Applies a verified top-up token (§7.3).
    pub fn apply(&mut self, token: &TopUp) -> Result<(), Error> {
        if token.instance_id != self.grant.instance_id || token.licence_id != self.grant.licence_id
        {
            return Err(Error::TopUpWrongInstance);
        }
        if token.seq <= self.topup_seq {
            return Err(Error::TopUpReplayed {
                seq: token.seq,
                applied: self.topup_seq,
            });
        }
        self.topup_seq = token.seq;
        self.total = token.total_queries;
        self.expires = token.expires.clone();
        Ok(())
    }

    /// The budget in force: the licence's, capped by the capsule's policy if
    /// one is loaded (§7.2).
    pub fn terms(&self, policy: Option<&Policy>) -> Terms {
        let mut total = self.total;
        let mut expires = self.expires.clone();
        if let Some(policy) = policy {
            if let Some(max) = policy.max_queries {
                total = total.min(max);
            }
            expires = match (expires, &policy.expires) {
                (Some(a), Some(b)) => Some(if *b < a { b.clone() } else { a }),
                (a, b) => a.or_else(|| b.clone()),
            };
        }
        Terms { total, expires }
    }
}

/// The budget in force for one query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Terms {
    /// Queries granted in total.
    pub total: u64,
    /// Last day the model may run, if any.
    pub expires: Option<String>,
}

impl Terms {
    /// Checks that `n` more queries may run today, `used` having run (§7.2).
    pub fn allow(&self, used: u64, n: u64, today: &str) -> Result<(), Error> {
        if let Some(expires) = &self.expires {
            // A date that is not YYYY-MM-DD cannot be compared: fail closed.
            if !is_iso_date(expires) || today > expires.as_str() {
                return Err(Error::LicenceExpired {
                    expires: expires.clone(),
                    today: today.to_owned(),
                });
            }
        }
        if used.checked_add(n).is_none_or(|after| after > self.total) {
            return Err(Error::BudgetExhausted {
                used,
                total: self.total,
            });
        }
        Ok(())
    }
}

fn aad(instance_id: &[u8; INSTANCE_ID_LEN]) -> Vec<u8> {
    [STATE_AAD, instance_id.as_slice()].concat()
}

/// Counts bytes written, to size a buffer before writing into it.
struct ByteCount(usize);

impl std::io::Write for ByteCount {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// True for `YYYY-MM-DD` with digits where digits belong.
fn is_iso_date(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit())
}

/// Today's date, UTC, as `YYYY-MM-DD`, by the system clock.
///
/// On `sim` the clock is the host's and the machine's owner can set it; on
/// hardware platforms a trusted time source would replace it.
pub(crate) fn today_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    civil_date((secs / 86_400) as i64)
}

/// The proleptic Gregorian date of a day number (days since 1970-01-01),
/// after Howard Hinnant's `civil_from_days`.
fn civil_date(days: i64) -> String {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use capsule_format::ModelKey;

    fn ledger(queries: u64, expires: Option<&str>) -> Ledger {
        Ledger::new(Grant::new(
            "lic".into(),
            [1; 16],
            [2; 16],
            &ModelKey::from_bytes([3; 32]),
            queries,
            expires.map(str::to_owned),
            [4; 32],
        ))
    }

    fn topup(seq: u64, total: u64) -> TopUp {
        TopUp {
            licence_id: "lic".into(),
            instance_id: [1; 16],
            seq,
            total_queries: total,
            expires: None,
        }
    }

    #[test]
    fn civil_dates_are_right_at_known_days() {
        assert_eq!(civil_date(0), "1970-01-01");
        assert_eq!(civil_date(11_016), "2000-02-29");
        assert_eq!(civil_date(19_782), "2024-02-29");
        assert_eq!(civil_date(20_088), "2024-12-31");
        assert_eq!(today_utc().len(), 10);
    }

    #[test]
    fn budget_refuses_what_would_go_over() {
        let terms = ledger(3, None).terms(None);
        assert!(terms.allow(0, 3, "2030-01-01").is_ok());
        assert!(matches!(
            terms.allow(2, 2, "2030-01-01"),
            Err(Error::BudgetExhausted { used: 2, total: 3 })
        ));
        assert!(terms.allow(u64::MAX, 1, "2030-01-01").is_err());
    }

    #[test]
    fn expiry_is_the_last_day_allowed_and_garbage_fails_closed() {
        let terms = ledger(9, Some("2030-01-01")).terms(None);
        assert!(terms.allow(0, 1, "2030-01-01").is_ok());
        assert!(matches!(
            terms.allow(0, 1, "2030-01-02"),
            Err(Error::LicenceExpired { .. })
        ));
        let garbage = ledger(9, Some("soon")).terms(None);
        assert!(garbage.allow(0, 1, "2000-01-01").is_err());
    }

    #[test]
    fn policy_caps_the_licence() {
        let l = ledger(100, Some("2031-01-01"));
        let policy = Policy {
            max_queries: Some(10),
            expires: Some("2030-06-30".into()),
            defense: None,
        };
        let terms = l.terms(Some(&policy));
        assert_eq!(terms.total, 10);
        assert_eq!(terms.expires.as_deref(), Some("2030-06-30"));
        let loose = Policy {
            max_queries: Some(1000),
            expires: None,
            defense: None,
        };
        assert_eq!(l.terms(Some(&loose)).total, 100);
        assert_eq!(l.terms(Some(&loose)).expires.as_deref(), Some("2031-01-01"));
    }

    #[test]
    fn topups_apply_once_in_order_and_only_here() {
        let mut l = ledger(5, None);
        l.apply(&topup(1, 20)).unwrap();
        assert_eq!((l.total, l.topup_seq), (20, 1));
        assert!(matches!(
            l.apply(&topup(1, 20)),
            Err(Error::TopUpReplayed { seq: 1, applied: 1 })
        ));
        l.apply(&topup(3, 40)).unwrap();
        assert!(matches!(
            l.apply(&topup(2, 30)),
            Err(Error::TopUpReplayed { .. })
        ));
        let mut other = topup(4, 50);
        other.instance_id = [9; 16];
        assert!(matches!(l.apply(&other), Err(Error::TopUpWrongInstance)));
        let mut other = topup(4, 50);
        other.licence_id = "lic-2".into();
        assert!(matches!(l.apply(&other), Err(Error::TopUpWrongInstance)));
        assert_eq!((l.total, l.topup_seq), (40, 3));
    }
}
