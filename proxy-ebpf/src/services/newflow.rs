//! The steps every new flow at tc and at XDP takes, in this order: `admit` (the frontend, and
//! whether the source may use it), `choose` (the backend, by the frontend's scheduler and
//! affinity), `towards` (the translated tuple, and whether to masquerade). Each hook then
//! routes the flow its own way and records it with `flow::nat::record`; what a hook does with
//! a step's refusal (drop, reject, pass on) is its own.

use proxy_common::{
    affinity::{AffinityKey, CLIENT_ADDR},
    reason::Reason,
    service::{FLAG_SNAT, FLAG_SOURCE_RANGES, ServiceValue},
};

use crate::{
    headers::Tuple,
    services::{frontend::Family, lb},
};

/// The frontend of `scope` the flow `t` is for, if its source may use it: Err(None) for no
/// frontend (not Service traffic), Err(Some(SourceRangeDrop)) for a source outside the
/// frontend's loadBalancerSourceRanges (semantics 7.8, 7.9).
#[inline(always)]
pub fn admit<F: Family>(t: &Tuple<F::Addr>, scope: u8) -> Result<ServiceValue, Option<Reason>> {
    let svc = F::frontend(t, scope).ok_or(None)?;
    if svc.has_flag(FLAG_SOURCE_RANGES) && !F::source_allowed(svc.id, &t.saddr) {
        return Err(Some(Reason::SourceRangeDrop));
    }
    Ok(svc)
}

/// The backend of `svc` for the flow `t` with hash `hash`: affinity by the client's address,
/// then the scheduler (`least`: a least-connection answer, as `lb::select` takes it).
#[inline(always)]
pub fn choose<F: Family>(
    svc: &ServiceValue,
    t: &Tuple<F::Addr>,
    hash: u32,
    least: u32,
) -> Result<lb::Choice, Reason> {
    let client = AffinityKey {
        port_id: svc.port_id,
        client_kind: CLIENT_ADDR,
        client: F::client_bytes(&t.saddr),
    };
    lb::select::<false>(svc, &client, hash, least)
}

/// The backend the socket layer chose for the pod flow `t` to frontend `svc_id` (Service port
/// `port_id`) when it landed on the pod itself and was left to tc to be masqueraded (hairpin,
/// semantics 7.14; `lb::remember_hairpin`): 0 for none. Taken instead of a new draw, so that
/// the pod reaches itself as often as under kube-proxy. A BPF function of its own: the key's
/// frame does not add to the caller's.
#[inline(never)]
pub fn hairpin_choice<F: Family>(t: &Tuple<F::Addr>, port_id: u32, svc_id: u32) -> u32 {
    lb::hairpin_choice(port_id, svc_id, &F::client_bytes(&t.saddr))
}

/// The flow `t` translated to the chosen backend, and whether it is masqueraded: for
/// externalTrafficPolicy Cluster (semantics 7.13) and when a client lands on itself (hairpin,
/// semantics 7.14), so that the reply comes back through this node.
#[inline(always)]
pub fn towards<F: Family>(
    t: &Tuple<F::Addr>,
    svc: &ServiceValue,
    choice: &lb::Choice,
) -> (Tuple<F::Addr>, bool) {
    let backend = F::backend_addr(&choice.backend);
    let to = Tuple {
        saddr: t.saddr,
        daddr: backend,
        sport: t.sport,
        dport: choice.backend.port,
        proto: t.proto,
    };
    (to, svc.has_flag(FLAG_SNAT) || backend == t.saddr)
}
