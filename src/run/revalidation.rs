//! Revalidation on block, the loop's side: a blocked packet to an address
//! the DNS guard once allowed for a name waits (`monitor::held`) while the
//! guard asks the name again (`dns::revalidate`), then is reported as
//! `dns-revalidated` or as a block that says what was found.

use std::time::{Instant, SystemTime};

use super::main_loop::Daemon;
use super::Input;
use crate::audit::evaluate::{self, Outcome as Decided};
use crate::dns::revalidate::{Outcome, Request};
use crate::dns::Revalidation;
use crate::monitor::attribution::Attribution;
use crate::monitor::event::{ResolvedName, RevalidationNote, Subject};
use crate::monitor::incident::Observation;
use crate::monitor::nflog::LoggedVerdict;
use crate::monitor::packet::Flow;

/// What becomes of a blocked packet.
pub(super) enum Hold {
    /// It waits for the guard's verdict.
    Held,
    /// Reported now, as before.
    Report,
    /// Reported now: over the lookup cap (the name, with that said).
    Limited(Box<ResolvedName>),
}

/// A blocked packet waiting for its address's verdict.
pub(super) struct HeldPacket {
    verdict: LoggedVerdict,
    flow: Flow,
    who: Attribution,
    at: SystemTime,
    /// The name the guard resolved to the address, and the rule that would
    /// allow this packet had the address still been in its set.
    name: String,
    rule: String,
}

impl Daemon {
    /// Holds `flow`'s packet for revalidation when that can let it through.
    pub(super) fn hold_for_revalidation(
        &mut self,
        verdict: &LoggedVerdict,
        flow: &Flow,
        who: &Attribution,
        at: SystemTime,
    ) -> Hold {
        let (Some(guard), Some(tx)) = (&self.services.guard, &self.services.loop_tx) else {
            return Hold::Report;
        };
        let Some(name) = guard.remembered(flow.dst) else {
            return Hold::Report;
        };
        // Would a rule take this packet if the address were still the
        // name's? Its port, protocol and sender must fit too.
        let attempt = evaluate::Attempt {
            dst: Some(flow.dst),
            protocol: flow.protocol,
            port: flow.dst_port(),
            icmp_type: None,
            uid: who.uid,
            gid: who.gid,
            cgroup: who.cgroup.clone(),
            unit: who.unit.clone(),
            domain: Some(name.clone()),
        };
        let decision = evaluate::evaluate(&self.policy, &attempt);
        if decision.outcome != Decided::Allowed || decision.host_pattern.is_none() {
            return Hold::Report;
        }
        let tx = tx.clone();
        let request = guard.revalidate(flow.dst, name.clone(), decision.rule.clone(), move |r| {
            // A full queue drops the verdict; the held packets are then
            // reported as blocks at their deadline.
            let _ = tx.try_send(Input::Revalidated(Box::new(r)));
        });
        match request {
            Request::Started { .. } | Request::Pending { .. } => {
                let packet = HeldPacket {
                    verdict: verdict.clone(),
                    flow: *flow,
                    who: who.clone(),
                    at,
                    name,
                    rule: decision.rule,
                };
                match self.held.hold(flow.dst, packet, Instant::now()) {
                    Ok(()) => Hold::Held,
                    Err(_) => Hold::Report,
                }
            }
            Request::Limited { name } => Hold::Limited(Box::new(ResolvedName {
                name,
                asked_by: None,
                revalidation: Some(RevalidationNote {
                    outcome: Outcome::Limited.as_str(),
                    current: Vec::new(),
                }),
            })),
        }
    }

    /// The guard's verdict for an address: report what waited for it.
    pub(super) fn revalidated(&mut self, r: Revalidation) {
        for packet in self.held.release(&r.address) {
            self.report_held(packet, &r.outcome);
        }
    }

    /// Packets whose verdict did not come in time (or all, when stopping).
    pub(super) fn overdue_revalidations(&mut self, stopping: bool) {
        let now = (!stopping).then(Instant::now);
        let late = Outcome::Failed("no verdict in time".into());
        for packet in self.held.overdue(now) {
            self.report_held(packet, &late);
        }
    }

    fn report_held(&mut self, p: HeldPacket, outcome: &Outcome) {
        let passed =
            matches!(outcome, Outcome::StillResolves { rules, .. } if rules.contains(&p.rule));
        let (outcome_name, current) = match outcome {
            Outcome::StillResolves { .. } if !passed => (Outcome::NotAllowed.as_str(), Vec::new()),
            Outcome::Stale { current } => (outcome.as_str(), current.clone()),
            other => (other.as_str(), Vec::new()),
        };
        let resolved = ResolvedName {
            name: p.name,
            asked_by: None,
            revalidation: Some(RevalidationNote {
                outcome: outcome_name,
                current,
            }),
        };
        let (verdict, subject) = if passed {
            let allowed = LoggedVerdict {
                blocked: false,
                rule: Some(p.rule),
            };
            (allowed, Subject::Revalidated(p.flow))
        } else {
            (p.verdict, Subject::Packet(Some(p.flow)))
        };
        self.record(Observation {
            verdict: &verdict,
            subject,
            attribution: &p.who,
            resolved: Some(&resolved),
            at: p.at,
        });
    }
}
