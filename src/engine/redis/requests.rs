//! What is sent to Redis: writes, catch-ups, probes and pings, and the scripts' arguments.

use super::*;

impl RedisEngine {
    pub(super) fn send_write(&mut self, cx: &mut Ctx<'_>, write: SentWrite, full_script: bool) {
        let Some(link) = self.cmd.as_mut() else {
            let error = self.unavailable();
            self.resolve(write.ticket, Outcome::refused(error));
            return;
        };
        let (script, sha) = match write.script {
            Script::Write => (scripts::WRITE, self.write_sha.as_str()),
            Script::Hold => (scripts::HOLD, self.hold_sha.as_str()),
        };
        let head: [&str; 2] = if full_script {
            ["EVAL", script]
        } else {
            ["EVALSHA", sha]
        };
        let mut args: Vec<&str> = Vec::with_capacity(head.len() + write.args.len());
        args.extend(head);
        args.extend(write.args.iter().map(String::as_str));
        link.command(&args);
        self.writes_in_flight += 1;
        self.expects.push_back(Expect::Write(Box::new(write)));
        let _ = cx;
    }

    pub(super) fn send_catch_up(&mut self, from: &str) {
        let Some(link) = self.cmd.as_mut() else {
            return;
        };
        let limit = CATCH_UP_CHUNK_SKUS.to_string();
        link.command(&[
            "EVALSHA",
            self.catch_up_sha.as_str(),
            "4",
            self.keys.stock.as_str(),
            self.keys.changed.as_str(),
            self.keys.seq.as_str(),
            self.keys.epoch.as_str(),
            from,
            limit.as_str(),
        ]);
        self.expects.push_back(Expect::CatchUp);
        self.catch_up_in_flight = true;
    }

    /// Starts a catch-up once both links are up (the feed first: changes after the catch-up's
    /// read then arrive through it).
    pub(super) fn maybe_catch_up(&mut self) {
        if !self.catch_up_needed
            || self.catch_up_in_flight
            || !self.feed_subscribed
            || self.cmd_state != LinkState::Up
        {
            return;
        }
        self.catch_up_needed = false;
        self.stats.resyncs_total += 1;
        let from = self.applied_seq.to_string();
        self.send_catch_up(&from);
    }

    /// Timers: write timeouts, the gap wait, probes, feed pings.
    pub(super) fn tick(&mut self, cx: &mut Ctx<'_>) {
        let now = self.now_ms;
        let oldest_write = self.expects.iter().find_map(|e| match e {
            Expect::Write(w) => Some(w.sent_ms),
            _ => None,
        });
        if oldest_write.is_some_and(|sent| now >= sent + WRITE_TIMEOUT_MS) {
            self.cmd_down(cx, format!("no reply within {WRITE_TIMEOUT_MS} ms"));
        }
        if let Some((_, first)) = self.reorder.first_key_value() {
            let waiting = self.catch_up_in_flight || self.catch_up_needed;
            if !waiting && now >= first.since_ms + GAP_WAIT_MS {
                self.stats.feed_gaps_total += 1;
                self.catch_up_needed = true;
            }
        }
        if self.cmd_state == LinkState::Up && !self.probe_in_flight && now >= self.probe_due_ms {
            if let Some(link) = self.cmd.as_mut() {
                link.command(&["GET", self.keys.seq.as_str()]);
                self.expects.push_back(Expect::Probe);
                self.probe_in_flight = true;
                self.probe_due_ms = now + PROBE_INTERVAL_MS;
            }
        }
        if self.feed_state == LinkState::Up {
            if let Some(sent) = self.feed_ping_sent_ms {
                if now >= sent + FEED_PING_INTERVAL_MS {
                    self.feed_down(cx, "no answer to ping".into());
                }
            } else if now >= self.feed_ping_due_ms {
                if let Some(link) = self.feed.as_mut() {
                    link.command(&["PING"]);
                    self.feed_ping_sent_ms = Some(now);
                    self.feed_ping_due_ms = now + FEED_PING_INTERVAL_MS;
                }
            }
        }
        self.maybe_catch_up();
        self.fire_expiries();
    }

    /// The idempotency key of `req` (the epoch key again when it has none: the scripts
    /// then ignore it) and its flag.
    pub(super) fn idem_args(&self, req: &WriteRequest) -> (String, &'static str) {
        match &req.idempotency_key {
            Some(key) => (format!("{}{key}", self.keys.idem_prefix), "1"),
            None => (self.keys.epoch.clone(), "0"),
        }
    }

    /// `ticket` is the write's own (unique in this process): with the process's random origin
    /// it makes the epoch the script sets if Redis has none, unique without reading
    /// /dev/urandom for every write.
    pub(super) fn write_args(
        &self,
        req: &WriteRequest,
        fingerprint: u64,
        ticket: u64,
    ) -> Vec<String> {
        let mut args = Vec::with_capacity(20 + 6 * req.ops.len());
        let (idem, keyed) = self.idem_args(req);
        let fresh_epoch = format!("{}-{ticket}", self.origin);
        let limits = self.config.hold_limits;
        args.extend([
            "8".to_string(),
            self.keys.stock.clone(),
            self.keys.changed.clone(),
            self.keys.seq.clone(),
            self.keys.epoch.clone(),
            idem,
            self.keys.holds.clone(),
            self.keys.held.clone(),
            self.keys.deadlines.clone(),
            self.keys.channel.clone(),
            fingerprint.to_string(),
            self.config.idempotency_ttl_secs.to_string(),
            fresh_epoch,
            keyed.to_string(),
            self.origin.clone(),
            self.keys.expired_prefix.clone(),
            limits.holds_max.to_string(),
            limits.lines_max.to_string(),
            limits.ttl_ms_max.min(TTL_MS_MAX).to_string(),
            req.ops.len().to_string(),
        ]);
        for op in &req.ops {
            args.push(op.sku.clone());
            args.push(scripts::action_name(op.action).to_string());
            args.push(op.amount.to_string());
            args.push(op.if_version.map_or("-1".to_string(), |v| v.to_string()));
            args.push(op.hold.clone().unwrap_or_default());
            args.push(op.ttl_ms.map_or("-1".to_string(), |t| t.to_string()));
        }
        args.push(self.config.skus_max.to_string());
        args
    }

    pub(super) fn hold_args(
        &self,
        req: &WriteRequest,
        hold: &str,
        action: HoldAction,
    ) -> Vec<String> {
        let (idem, keyed) = self.idem_args(req);
        let ttl_ms = match action {
            HoldAction::Extend { ttl_ms } => ttl_ms,
            HoldAction::Commit | HoldAction::Release => 0,
        };
        vec![
            "9".to_string(),
            self.keys.stock.clone(),
            self.keys.changed.clone(),
            self.keys.seq.clone(),
            self.keys.epoch.clone(),
            idem,
            self.keys.holds.clone(),
            self.keys.held.clone(),
            self.keys.deadlines.clone(),
            format!("{}{hold}", self.keys.expired_prefix),
            self.keys.channel.clone(),
            req.fingerprint().0.to_string(),
            self.config.idempotency_ttl_secs.to_string(),
            keyed.to_string(),
            self.origin.clone(),
            hold.to_string(),
            action.as_str().to_string(),
            ttl_ms.to_string(),
            self.config
                .hold_limits
                .ttl_ms_max
                .min(TTL_MS_MAX)
                .to_string(),
        ]
    }
}
