//! A re-read policy (SIGHUP, `egret reload`) and unit cgroups that changed:
//! both swap what is loaded without stopping the daemon. A policy that is
//! invalid, unsafe or needs a restart is refused and the running one stays.

use std::time::Duration;

use anyhow::{Context, Result};
use tracing::{error, info, warn};

use super::main_loop::Daemon;
use crate::alert::Dispatcher;
use crate::apply;
use crate::dns::GuardConfig;
use crate::policy::Policy;
use crate::proxy::ProxyState;
use crate::ruleset::Ruleset;

/// What a reload cannot change (the listening sockets, the NFLOG group), or
/// None when `new` may replace `old`.
fn needs_restart(old: &Policy, new: &Policy) -> Option<String> {
    if new.log_group != old.log_group {
        return Some(format!(
            "log_group changed ({} → {}); that needs a restart",
            old.log_group, new.log_group
        ));
    }
    let listen = |p: &Policy| p.dns.as_ref().map(|d| d.listen);
    if listen(new) != listen(old) {
        return Some("the [dns] section was added, removed or its listen address changed; that needs a restart".into());
    }
    let for_containers = |p: &Policy| {
        (p.scope == crate::policy::Scope::HostAndContainers)
            .then(|| p.dns.as_ref().map(|d| d.container_listen))
            .flatten()
    };
    if for_containers(new) != for_containers(old) {
        return Some("the guard's listener for containers (scope = \"host+containers\" with [dns], container_listen) was added, removed or moved; that needs a restart".into());
    }
    if new.metrics != old.metrics {
        return Some("the [metrics] section was added, removed or its listen address changed; that needs a restart".into());
    }
    if new.api != old.api {
        return Some(
            "the [api] section was added, removed or changed; that needs a restart".into(),
        );
    }
    let proxy_listen = |p: &Policy| p.proxy.as_ref().map(|x| x.listen);
    if proxy_listen(new) != proxy_listen(old) {
        return Some("the [proxy] section was added, removed or its listen address changed; that needs a restart".into());
    }
    None
}

impl Daemon {
    pub fn reload(&mut self) {
        let Some(path) = self.opts.policy_path.clone() else {
            info!("reload: running on the embedded default policy; nothing to re-read");
            return;
        };
        let policy = match apply::load_policy_strict(&path) {
            Ok(p) => p,
            Err(crate::policy::LoadError::Unsafe(unsafe_files)) => {
                for f in &unsafe_files {
                    error!("reload: refusing an unsafe policy file: {f}");
                }
                error!("reload: someone other than root could change what egret allows; the running policy stays");
                return;
            }
            Err(crate::policy::LoadError::Invalid(errors)) => {
                for d in &errors.0 {
                    error!("{d}");
                }
                error!(
                    "reload: {} has {} error(s); the running policy stays",
                    path.display(),
                    errors.0.len()
                );
                return;
            }
        };
        if let Err(e) =
            crate::kernel::features::require(&policy, &crate::kernel::features::running_release())
        {
            error!("reload: {e}; the running policy stays");
            return;
        }
        if let Some(why) = needs_restart(&self.policy, &policy) {
            error!("reload: {why}. The running policy stays");
            return;
        }
        let units = apply::resolve_units(&policy);
        let guard_config = GuardConfig::from_policy(&policy);
        let applied = apply::compile_with_units(
            &policy,
            units.clone(),
            apply::Seeds::Kept(&self.table.seeded),
        )
        .and_then(|rs| self.swap_ruleset(&rs, guard_config));
        match applied {
            Ok(()) => {
                if let (Some(p), Some(state)) =
                    (&self.services.proxy, ProxyState::from_policy(&policy))
                {
                    p.reload(state);
                }
                self.classifier.rules = policy.severity.clone();
                if (policy.scope, &policy.container_runtime)
                    != (self.policy.scope, &self.policy.container_runtime)
                {
                    self.containers = super::container_directory(&policy);
                }
                if policy.alerts != self.outlet.alerts.configs() || policy.mark != self.policy.mark
                {
                    self.restart_alerts(&policy);
                }
                info!(policy = %path.display(), mode = %policy.mode, rules = policy.rules.len(), "reloaded");
                self.policy = policy;
                super::record_settings(&mut self.store, &self.policy);
                self.units = units;
                self.books.reloads += 1;
                self.write_books();
            }
            Err(e) => error!("reload failed, the running policy stays: {e:#}"),
        }
    }

    /// New sinks from a reloaded policy; the old ones get a moment to send
    /// what they hold.
    fn restart_alerts(&mut self, policy: &Policy) {
        match Dispatcher::start(policy, &self.host) {
            Ok(d) => {
                self.services.metrics.set_alerts(d.stats());
                std::mem::replace(&mut self.outlet.alerts, d).stop(Duration::from_secs(1));
                info!(sinks = policy.alerts.len(), "alert sinks reconfigured");
            }
            Err(e) => error!("reload: the alert sinks could not start, the old ones stay: {e:#}"),
        }
    }

    /// Swaps the whole ruleset; the old one's counts are kept in the books.
    /// With a DNS guard, the swap happens with its set writer held (and its
    /// configuration replaced by `guard_config`, if given).
    fn swap_ruleset(&mut self, rs: &Ruleset, guard_config: Option<GuardConfig>) -> Result<()> {
        let nft = &mut self.nft;
        let mut swap = || -> Result<u64> {
            let last = nft.logged_packets().ok().flatten().unwrap_or(0);
            nft.apply(rs).context("loading the ruleset")?;
            Ok(last)
        };
        let last = match &self.services.guard {
            Some(g) => g.swap(guard_config, swap)?,
            None => swap()?,
        };
        self.books.accounting.retire(last);
        self.table.loaded(rs);
        Ok(())
    }

    /// A restarted unit gets a new cgroup (new id): follow it, or its
    /// `units` rules would silently stop matching.
    pub fn refresh_units(&mut self) {
        if !self.policy.rules.iter().any(|r| !r.units.is_empty()) {
            return;
        }
        let units = apply::resolve_units(&self.policy);
        if units == self.units {
            return;
        }
        let seeds = apply::Seeds::Kept(&self.table.seeded);
        let rs = match apply::compile_with_units(&self.policy, units.clone(), seeds) {
            Ok(rs) => rs,
            Err(e) => return warn!("recompiling for changed unit cgroups: {e:#}"),
        };
        let cg_sets = |rs: &Ruleset| -> Vec<String> {
            rs.sets
                .iter()
                .filter(|s| s.is_cgroup())
                .map(|s| s.name.clone())
                .collect()
        };
        let live = apply::compile_with_units(&self.policy, self.units.clone(), seeds).ok();
        let same_shape = live.as_ref().is_some_and(|l| cg_sets(l) == cg_sets(&rs));
        let result = if same_shape {
            // Same sets, new members: swap elements only (counters survive).
            let swapped: Vec<&crate::ruleset::Set> =
                rs.sets.iter().filter(|s| s.is_cgroup()).collect();
            swapped
                .iter()
                .try_for_each(|s| {
                    self.nft.replace_elements(s, &s.elements)?;
                    // Only this set changed: the rest of the table (the
                    // seeds loaded before, some closed since) is as it was.
                    self.table.watch.expect_elements(&[s]);
                    if let Some((_, n)) = self.table.sets.iter_mut().find(|(x, _)| x.name == s.name)
                    {
                        *n = s.elements.len() as u64;
                    }
                    Ok(())
                })
                .map_err(|e: crate::kernel::nft::NftError| anyhow::Error::from(e))
        } else {
            self.swap_ruleset(&rs, None)
        };
        match result {
            Ok(()) => {
                info!(units = ?units.keys().collect::<Vec<_>>(), "unit cgroups changed; unit rules follow them");
                self.units = units;
                self.books.unit_changes += 1;
                self.write_books();
            }
            Err(e) => warn!("updating unit cgroups: {e:#}"),
        }
    }
}
