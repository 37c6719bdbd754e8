//! The agent's own health, as kube-proxy reports it on /healthz and /livez (semantics
//! 8.6-8.9): healthy at startup and after a successful sync; unhealthy once a change has been
//! queued for `timeout` without a successful sync since. /healthz additionally requires the
//! Node to be eligible (not being deleted); /livez does not.
//!
//! Every method takes the current time, so tests (and callers) inject the clock.

use std::{
    sync::{Mutex, MutexGuard},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Serialize, Serializer, ser::SerializeMap};

use crate::{compile::Family, metrics::ip_family_name};

/// kube-proxy's default sync period (semantics 11.9).
pub const DEFAULT_SYNC_PERIOD: Duration = Duration::from_secs(30);

/// kube-proxy's healthTimeout: 2 x syncPeriod (semantics 8.6).
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(2 * 30);

/// Which endpoint is asking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    /// /healthz: proxy health and Node eligibility.
    Healthz,
    /// /livez: proxy health only.
    Livez,
}

#[derive(Clone, Copy, Debug)]
struct FamilyState {
    /// `None` in the single-state mode (no families given).
    family: Option<Family>,
    /// Last successful sync; the construction time until the first one.
    last_updated: SystemTime,
    /// When the oldest change not yet synced was queued.
    oldest_queued: Option<SystemTime>,
}

#[derive(Debug)]
struct Inner {
    states: Vec<FamilyState>,
    node_eligible: bool,
}

/// Health of one family in a [`HealthReport`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FamilyHealth {
    pub family: Family,
    pub last_updated: SystemTime,
    pub healthy: bool,
}

/// A point-in-time evaluation of [`Health`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthReport {
    pub current_time: SystemTime,
    /// Latest successful sync over all families (construction time before the first).
    pub last_updated: SystemTime,
    /// Proxy health over all families; Node eligibility is separate.
    pub healthy: bool,
    pub node_eligible: bool,
    /// Per family, empty when [`Health`] was built without families.
    pub status: Vec<FamilyHealth>,
}

/// Thread-safe proxy health state.
#[derive(Debug)]
pub struct Health {
    timeout: Duration,
    inner: Mutex<Inner>,
}

impl Health {
    /// `timeout`: how long a queued change may wait for a successful sync (kube-proxy:
    /// [`DEFAULT_HEALTH_TIMEOUT`]). `families`: the IP families reported under "status"; with
    /// none, a single unlabeled state is kept and "status" is omitted. `now` counts as the last
    /// update, so the agent is healthy at startup; unlike kube-proxy, which ignores a proxier
    /// until its first successful sync, a change queued at startup that never gets synced
    /// does make the agent unhealthy after `timeout`.
    pub fn new(timeout: Duration, families: &[Family], now: SystemTime) -> Health {
        let mut families: Vec<Option<Family>> = families.iter().copied().map(Some).collect();
        families.sort();
        families.dedup();
        if families.is_empty() {
            families.push(None);
        }
        Health {
            timeout,
            inner: Mutex::new(Inner {
                states: families
                    .into_iter()
                    .map(|family| FamilyState {
                        family,
                        last_updated: now,
                        oldest_queued: None,
                    })
                    .collect(),
                node_eligible: true,
            }),
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, family: Option<Family>, f: impl Fn(&mut FamilyState)) {
        for s in self.lock().states.iter_mut() {
            if family.is_none() || s.family == family {
                f(s);
            }
        }
    }

    /// A change arrived that needs a sync (kube-proxy: QueuedUpdate), for every family. Only
    /// the oldest pending change counts.
    pub fn queued(&self, now: SystemTime) {
        self.update(None, |s| {
            s.oldest_queued.get_or_insert(now);
        });
    }

    /// A sync succeeded (kube-proxy: Updated), for every family.
    pub fn synced(&self, now: SystemTime) {
        self.update(None, |s| {
            s.oldest_queued = None;
            s.last_updated = now;
        });
    }

    /// [`Health::queued`] for one family only.
    pub fn queued_family(&self, family: Family, now: SystemTime) {
        self.update(Some(family), |s| {
            s.oldest_queued.get_or_insert(now);
        });
    }

    /// [`Health::synced`] for one family only.
    pub fn synced_family(&self, family: Family, now: SystemTime) {
        self.update(Some(family), |s| {
            s.oldest_queued = None;
            s.last_updated = now;
        });
    }

    /// Node eligibility for /healthz (semantics 8.8): false while the Node has a
    /// deletionTimestamp or the ToBeDeletedByClusterAutoscaler taint. True until set.
    pub fn set_node_eligible(&self, eligible: bool) {
        self.lock().node_eligible = eligible;
    }

    pub fn node_eligible(&self) -> bool {
        self.lock().node_eligible
    }

    fn state_healthy(&self, s: &FamilyState, now: SystemTime) -> bool {
        match s.oldest_queued {
            None => true,
            // A clock that went backwards counts as no time elapsed.
            Some(q) => now.duration_since(q).unwrap_or_default() < self.timeout,
        }
    }

    /// Proxy health (no Node eligibility; that is [`Health::probe`] with [`Probe::Healthz`]).
    pub fn is_healthy(&self, now: SystemTime) -> bool {
        let inner = self.lock();
        inner.states.iter().all(|s| self.state_healthy(s, now))
    }

    pub fn report(&self, now: SystemTime) -> HealthReport {
        let inner = self.lock();
        let mut healthy = true;
        let mut last_updated = UNIX_EPOCH;
        let mut status = Vec::new();
        for s in &inner.states {
            let h = self.state_healthy(s, now);
            healthy &= h;
            last_updated = last_updated.max(s.last_updated);
            if let Some(family) = s.family {
                status.push(FamilyHealth {
                    family,
                    last_updated: s.last_updated,
                    healthy: h,
                });
            }
        }
        HealthReport {
            current_time: now,
            last_updated,
            healthy,
            node_eligible: inner.node_eligible,
            status,
        }
    }

    /// The HTTP status (200 or 503) and JSON body for `probe` at `now` (semantics 8.9, 1.33+
    /// shape): `lastUpdated` (the current time when the answer is 200, else the latest
    /// successful sync), `currentTime`, `healthy` (proxy health), `nodeEligible` (/healthz
    /// only), and `status` per family (`lastUpdated`, `healthy`) when families were given.
    pub fn probe(&self, probe: Probe, now: SystemTime) -> (u16, String) {
        let report = self.report(now);
        let ok = report.healthy && (probe == Probe::Livez || report.node_eligible);
        let last_updated = if ok { now } else { report.last_updated };
        let mut status: Vec<(&str, FamilyBody)> = report
            .status
            .iter()
            .map(|f| {
                let body = FamilyBody {
                    last_updated: rfc3339(f.last_updated),
                    healthy: f.healthy,
                };
                (ip_family_name(f.family), body)
            })
            .collect();
        status.sort_by_key(|(name, _)| *name);
        let body = Body {
            last_updated: rfc3339(last_updated),
            current_time: rfc3339(now),
            node_eligible: (probe == Probe::Healthz).then_some(report.node_eligible),
            healthy: report.healthy,
            status: (!status.is_empty()).then_some(Status(status)),
        };
        // A struct of strings, booleans and a list of pairs: serialising it cannot fail.
        let body = serde_json::to_string(&body).unwrap_or_default();
        (if ok { 200 } else { 503 }, body)
    }
}

/// The JSON body of /healthz and /livez, its keys in kube-proxy's order (its ProxyHealth
/// struct's: `lastUpdated`, `currentTime`, `nodeEligible`, `healthy`, `status`), so that an
/// answer reads byte for byte like kube-proxy's.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Body {
    last_updated: String,
    current_time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    node_eligible: Option<bool>,
    healthy: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<Status>,
}

/// `status`: one object per family, keyed `IPv4`/`IPv6` in that order (Go writes a map's
/// keys sorted).
struct Status(Vec<(&'static str, FamilyBody)>);

impl Serialize for Status {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (name, body) in &self.0 {
            map.serialize_entry(name, body)?;
        }
        map.end()
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct FamilyBody {
    last_updated: String,
    healthy: bool,
}

/// `t` in RFC 3339, UTC, with nanoseconds when non-zero and trailing zeros trimmed (what Go's
/// time.Time JSON encoding produces), e.g. `2023-11-14T22:13:20.5Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let (secs, nanos) = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
        Err(e) => {
            let d = e.duration();
            let (s, n) = (d.as_secs() as i64, d.subsec_nanos());
            if n == 0 {
                (-s, 0)
            } else {
                (-s - 1, 1_000_000_000 - n)
            }
        }
    };
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let mut out = format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        sod / 3600,
        sod / 60 % 60,
        sod % 60
    );
    if nanos != 0 {
        let frac = format!("{nanos:09}");
        out.push('.');
        out.push_str(frac.trim_end_matches('0'));
    }
    out.push('Z');
    out
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], March-based
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    const T0: u64 = 1_700_000_000;

    #[test]
    fn rfc3339_formatting() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(at(T0)), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(at(951_782_400)), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(at(951_868_799)), "2000-02-29T23:59:59Z");
        assert_eq!(rfc3339(at(4_107_542_400)), "2100-03-01T00:00:00Z");
        assert_eq!(rfc3339(at(253_402_300_799)), "9999-12-31T23:59:59Z");
        assert_eq!(
            rfc3339(at(T0) + Duration::from_nanos(123_456_789)),
            "2023-11-14T22:13:20.123456789Z"
        );
        assert_eq!(
            rfc3339(at(T0) + Duration::from_millis(500)),
            "2023-11-14T22:13:20.5Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH - Duration::from_millis(1500)),
            "1969-12-31T23:59:58.5Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH - Duration::from_secs(86_400)),
            "1969-12-31T00:00:00Z"
        );
    }

    #[test]
    fn rfc3339_matches_day_arithmetic_over_centuries() {
        // Every day from 1900 to about 2399: the date advances by exactly one day each step.
        let mut prev = civil_from_days(-25_567); // 1900-01-01
        assert_eq!(prev, (1900, 1, 1));
        for day in -25_566..157_000 {
            let (y, m, d) = civil_from_days(day);
            let (py, pm, pd) = prev;
            let leap = (py % 4 == 0 && py % 100 != 0) || py % 400 == 0;
            let month_len = match pm {
                2 if leap => 29,
                2 => 28,
                4 | 6 | 9 | 11 => 30,
                _ => 31,
            };
            let expected = if pd < month_len {
                (py, pm, pd + 1)
            } else if pm < 12 {
                (py, pm + 1, 1)
            } else {
                (py + 1, 1, 1)
            };
            assert_eq!((y, m, d), expected, "day {day}");
            prev = (y, m, d);
        }
    }

    #[test]
    fn transitions() {
        let h = Health::new(DEFAULT_HEALTH_TIMEOUT, &[Family::V4, Family::V6], at(T0));
        // Healthy at startup, even long after, while nothing is queued.
        assert!(h.is_healthy(at(T0)));
        assert!(h.is_healthy(at(T0 + 3600)));
        // Queued: healthy until the timeout passes without a sync.
        h.queued(at(T0 + 10));
        assert!(h.is_healthy(at(T0 + 69)));
        assert!(!h.is_healthy(at(T0 + 70)));
        // Re-queuing does not reset the clock: the oldest pending change counts.
        h.queued(at(T0 + 65));
        assert!(!h.is_healthy(at(T0 + 71)));
        // A successful sync makes it healthy again.
        h.synced(at(T0 + 80));
        assert!(h.is_healthy(at(T0 + 80)));
        assert!(h.is_healthy(at(T0 + 1000)));
        // A new change starts a new clock.
        h.queued(at(T0 + 1000));
        assert!(h.is_healthy(at(T0 + 1059)));
        assert!(!h.is_healthy(at(T0 + 1060)));
        // A clock that went backwards is not a timeout.
        assert!(h.is_healthy(at(T0)));
    }

    #[test]
    fn per_family_and_custom_timeout() {
        let h = Health::new(Duration::from_secs(5), &[Family::V4, Family::V6], at(T0));
        h.queued(at(T0));
        h.synced_family(Family::V4, at(T0 + 1));
        assert!(!h.is_healthy(at(T0 + 5)));
        let r = h.report(at(T0 + 5));
        assert!(!r.healthy);
        assert_eq!(r.last_updated, at(T0 + 1));
        assert_eq!(
            r.status,
            vec![
                FamilyHealth {
                    family: Family::V4,
                    last_updated: at(T0 + 1),
                    healthy: true
                },
                FamilyHealth {
                    family: Family::V6,
                    last_updated: at(T0),
                    healthy: false
                },
            ]
        );
        h.synced_family(Family::V6, at(T0 + 6));
        assert!(h.is_healthy(at(T0 + 6)));
        h.queued_family(Family::V6, at(T0 + 7));
        assert!(h.is_healthy(at(T0 + 11)));
        assert!(!h.is_healthy(at(T0 + 12)));
    }

    fn parse(body: &str) -> Value {
        serde_json::from_str(body).unwrap()
    }

    #[test]
    fn probe_bodies() {
        let h = Health::new(DEFAULT_HEALTH_TIMEOUT, &[Family::V4], at(T0));
        let now = at(T0 + 5) + Duration::from_millis(250);
        let (code, body) = h.probe(Probe::Healthz, now);
        assert_eq!(code, 200);
        assert_eq!(
            parse(&body),
            json!({
                "lastUpdated": "2023-11-14T22:13:25.25Z",
                "currentTime": "2023-11-14T22:13:25.25Z",
                "nodeEligible": true,
                "healthy": true,
                "status": {"IPv4": {"lastUpdated": "2023-11-14T22:13:20Z", "healthy": true}},
            })
        );
        let (code, body) = h.probe(Probe::Livez, now);
        assert_eq!(code, 200);
        assert!(parse(&body).get("nodeEligible").is_none());

        // Unhealthy: 503 on both, lastUpdated is the last successful sync.
        h.synced(at(T0 + 1));
        h.queued(at(T0 + 2));
        let now = at(T0 + 62);
        for probe in [Probe::Healthz, Probe::Livez] {
            let (code, body) = h.probe(probe, now);
            assert_eq!(code, 503);
            let v = parse(&body);
            assert_eq!(v["lastUpdated"], "2023-11-14T22:13:21Z");
            assert_eq!(v["currentTime"], "2023-11-14T22:14:22Z");
            assert_eq!(v["healthy"], false);
            assert_eq!(v["status"]["IPv4"]["healthy"], false);
        }

        // Ineligible Node: /healthz 503 (proxy itself still healthy), /livez 200.
        h.synced(at(T0 + 63));
        h.set_node_eligible(false);
        let (code, body) = h.probe(Probe::Healthz, at(T0 + 64));
        assert_eq!(code, 503);
        let v = parse(&body);
        assert_eq!(v["nodeEligible"], false);
        assert_eq!(v["healthy"], true);
        assert_eq!(v["lastUpdated"], "2023-11-14T22:14:23Z");
        assert_eq!(h.probe(Probe::Livez, at(T0 + 64)).0, 200);
    }

    /// The keys come in kube-proxy's order (its ProxyHealth struct's; semantics 8.9), so that
    /// a body compared as text reads as kube-proxy's does.
    #[test]
    fn probe_body_keys_are_in_kube_proxys_order() {
        let h = Health::new(DEFAULT_HEALTH_TIMEOUT, &[Family::V6, Family::V4], at(T0));
        let (_, body) = h.probe(Probe::Healthz, at(T0));
        assert_eq!(
            body,
            "{\"lastUpdated\":\"2023-11-14T22:13:20Z\",\"currentTime\":\"2023-11-14T22:13:20Z\",\
             \"nodeEligible\":true,\"healthy\":true,\"status\":{\"IPv4\":{\"lastUpdated\":\
             \"2023-11-14T22:13:20Z\",\"healthy\":true},\"IPv6\":{\"lastUpdated\":\
             \"2023-11-14T22:13:20Z\",\"healthy\":true}}}"
        );
        let (_, body) =
            Health::new(DEFAULT_HEALTH_TIMEOUT, &[], at(T0)).probe(Probe::Livez, at(T0));
        assert_eq!(
            body,
            "{\"lastUpdated\":\"2023-11-14T22:13:20Z\",\"currentTime\":\"2023-11-14T22:13:20Z\",\
             \"healthy\":true}"
        );
    }

    #[test]
    fn without_families_status_is_omitted() {
        let h = Health::new(Duration::from_secs(1), &[], at(T0));
        let (code, body) = h.probe(Probe::Livez, at(T0));
        assert_eq!(code, 200);
        let v = parse(&body);
        assert!(v.get("status").is_none());
        assert_eq!(v["healthy"], true);
        h.queued(at(T0));
        assert_eq!(h.probe(Probe::Livez, at(T0 + 1)).0, 503);
        h.queued_family(Family::V4, at(T0)); // no such family: no effect
        h.synced(at(T0 + 2));
        assert_eq!(h.probe(Probe::Livez, at(T0 + 3)).0, 200);
    }
}
