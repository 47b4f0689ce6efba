//! Each process's mirror of the holds kept in Redis: learned from replies, the feed and
//! chunked reloads; deadlines armed locally, expiry fired by whichever process comes first.

use super::*;

impl RedisEngine {
    /// A hold event of the change at `seq`, unless a newer reload chunk already set the hold
    /// (then it returns false).
    pub(super) fn apply_hold_event(&mut self, seq: u64, event: &HoldEvent) -> bool {
        let hold = event.hold();
        if self.reload_guard.get(hold).is_some_and(|&at| at >= seq) {
            return false;
        }
        if self.reload_cursor.is_some() {
            self.reload_guard.insert(hold.into(), seq);
        }
        match event {
            HoldEvent::Live {
                deadline_ms, lines, ..
            } => self.set_hold(hold, Some((*deadline_ms, lines))),
            HoldEvent::Gone { .. } => self.set_hold(hold, None),
            HoldEvent::Expired { at_ms, .. } => {
                self.holds.set(hold, HoldState::Expired { at_ms: *at_ms });
            }
        }
        true
    }

    /// A hold live in the mirror but gone from Redis, its deadline passed: the change that
    /// ended it reached this process only as states (a catch-up after the feed lost it), so
    /// it most likely expired. It is remembered as expired (`get` answers `hold_expired`; a
    /// commit is decided by Redis anyway) and reported, so its holder hears `hold_expired`
    /// (the states are the replica's; the service never broadcasts a version twice).
    pub(super) fn ghost_expired(&mut self, hold: &str, deadline_ms: u64, through_seq: u64) {
        let lines: Vec<SkuId> = match self.holds.state(hold, 0) {
            HoldState::Live { lines, .. } => lines.iter().map(|&(sku, _)| sku).collect(),
            _ => return,
        };
        let now = wall_ms();
        self.holds.set(hold, HoldState::Expired { at_ms: now });
        // A change about it still on its way (older than what Redis showed) is skipped.
        self.reload_guard.insert(hold.into(), through_seq);
        self.reload_through = self.reload_through.max(through_seq);
        let changed = lines
            .into_iter()
            .map(|sku| (sku, self.replica.get(sku)))
            .collect();
        self.flush_remote();
        self.events.push(Progress::HoldExpired {
            hold: hold.to_string(),
            changed,
            lag_ms: now.saturating_sub(deadline_ms),
        });
    }

    /// Sets a hold live with its lines and deadline (arming its timer), or gone.
    pub(super) fn set_hold(&mut self, hold: &str, live: Option<(u64, &[(String, u64)])>) {
        let Some((deadline_ms, lines)) = live else {
            self.holds.set(hold, HoldState::Gone);
            return;
        };
        let mut interned = Vec::with_capacity(lines.len());
        for (name, units) in lines {
            match self.replica.intern(name) {
                Ok(sku) => interned.push((sku, *units)),
                Err(e) => warn!("ignoring hold `{hold}` line `{name}` from Redis: {e}"),
            }
        }
        if interned.is_empty() {
            self.holds.set(hold, HoldState::Gone);
            return;
        }
        self.holds.set(
            hold,
            HoldState::Live {
                lines: interned,
                deadline_ms,
            },
        );
        self.timers.push(Reverse((deadline_ms, hold.into())));
        if self.timers.len() > 2 * self.holds.live_len() + TIMER_SLACK_ENTRIES {
            self.timers = self
                .holds
                .live()
                .map(|(name, _, deadline_ms)| Reverse((deadline_ms, name.into())))
                .collect();
        }
    }

    pub(super) fn view(&self, hold: &str, now_ms: u64) -> Result<HoldView, ApiError> {
        HoldView::of(&self.holds, hold, now_ms)
    }

    /// Sends EXPIRE_HOLD for every mirrored hold whose deadline passed (whichever process
    /// runs it first releases the hold; for the others it is a no-op).
    pub(super) fn fire_expiries(&mut self) {
        if self.cmd_state != LinkState::Up || self.refusing().is_some() {
            return;
        }
        let now = wall_ms();
        while let Some(Reverse((at, _))) = self.timers.peek() {
            if *at > now || self.expiring.len() >= EXPIRIES_IN_FLIGHT_MAX {
                break;
            }
            let Some(Reverse((_, hold))) = self.timers.pop() else {
                break;
            };
            let due = matches!(
                self.holds.state(&hold, now),
                HoldState::Live { deadline_ms, .. } if deadline_ms <= now
            );
            if !due || self.expiring.contains(&hold) {
                continue;
            }
            let Some(link) = self.cmd.as_mut() else {
                break;
            };
            let marker = format!("{}{hold}", self.keys.expired_prefix);
            let marker_ms = EXPIRED_MARKER_MS.to_string();
            // Another origin than our writes': nobody waits for this reply, so the change is
            // applied from whichever of the feed and the reply comes first.
            let origin = format!("{}-expiry", self.origin);
            link.command(&[
                "EVALSHA",
                self.expire_sha.as_str(),
                "9",
                self.keys.stock.as_str(),
                self.keys.changed.as_str(),
                self.keys.seq.as_str(),
                self.keys.epoch.as_str(),
                self.keys.holds.as_str(),
                self.keys.held.as_str(),
                self.keys.deadlines.as_str(),
                marker.as_str(),
                self.keys.expired_index.as_str(),
                self.keys.channel.as_str(),
                origin.as_str(),
                &hold,
                marker_ms.as_str(),
            ]);
            self.expiring.insert(hold.clone());
            self.expects.push_back(Expect::Expire(hold));
        }
    }

    pub(super) fn on_expire_reply(&mut self, cx: &mut Ctx<'_>, hold: Box<str>, value: Value) {
        self.expiring.remove(&hold);
        let retry = |engine: &mut Self, after_ms: u64| {
            let at = wall_ms() + after_ms.max(EXPIRY_RETRY_MS);
            engine.timers.push(Reverse((at, hold.clone())));
        };
        let items = match value {
            Value::Array(items) => items,
            Value::Error(e) if e.starts_with("NOSCRIPT") => {
                // The script cache was flushed: load the scripts again on this link (the
                // replies are only checked for errors), then try again.
                if let Some(link) = self.cmd.as_mut() {
                    for script in scripts::ALL {
                        link.command(&["SCRIPT", "LOAD", script]);
                        self.expects.push_back(Expect::Setup("SCRIPT LOAD"));
                    }
                }
                retry(self, 0);
                return;
            }
            Value::Error(e) => {
                error!("Redis refused to expire hold `{hold}`: {e}");
                retry(self, 1_000);
                return;
            }
            other => {
                self.cmd_down(cx, format!("unexpected expiry reply {other:?}"));
                return;
            }
        };
        let int = |i: usize| {
            items
                .get(i)
                .and_then(Value::as_int)
                .and_then(|n| u64::try_from(n).ok())
        };
        match items.first().and_then(Value::as_str) {
            Some("ok") => {
                let change = items
                    .get(2)
                    .and_then(Value::as_str)
                    .and_then(scripts::parse_change);
                let (Some(seq), Some(change)) = (int(1), change) else {
                    self.cmd_down(cx, "malformed expiry reply".into());
                    return;
                };
                let epoch = change.epoch.to_string();
                self.check_epoch(&epoch);
                let states = owned(change.states);
                self.offer(seq, states, change.holds, None, false);
            }
            Some("gone") => {
                // Still live here although every change up to `seq` is applied: a hold the
                // mirror kept by mistake (a reload raced with its end). Its deadline passed,
                // so it most likely expired. (Usually the other process's expiry is already
                // applied here, and the hold is marked expired: left as is.)
                if let (Some(seq), HoldState::Live { deadline_ms, .. }) =
                    (int(1), self.holds.state(&hold, 0))
                {
                    if seq <= self.applied_seq {
                        self.ghost_expired(&hold, deadline_ms, seq);
                    }
                }
            }
            Some("later") => {
                let (deadline, now) = (int(1).unwrap_or(0), int(2).unwrap_or(0));
                retry(self, deadline.saturating_sub(now));
            }
            _ => self.cmd_down(cx, "unexpected expiry reply".into()),
        }
    }

    /// Starts reloading the hold mirror (after a catch-up: changes the feed lost may have
    /// taken, ended or extended holds).
    pub(super) fn start_holds_reload(&mut self) {
        if self.reload_cursor.is_some() {
            self.reload_again = true;
            return;
        }
        self.reload_guard.clear();
        self.reload_cursor = Some("0".into());
        self.send_holds_chunk();
    }

    pub(super) fn send_holds_chunk(&mut self) {
        let (Some(link), Some(cursor)) = (self.cmd.as_mut(), self.reload_cursor.as_ref()) else {
            return;
        };
        let count = HOLDS_CHUNK.to_string();
        link.command(&[
            "EVALSHA",
            self.holds_sha.as_str(),
            "2",
            self.keys.holds.as_str(),
            self.keys.seq.as_str(),
            cursor.as_str(),
            count.as_str(),
            "hash",
        ]);
        self.expects.push_back(Expect::Holds);
    }

    pub(super) fn on_holds_chunk(&mut self, cx: &mut Ctx<'_>, value: Value) {
        let chunk = match HoldsChunk::parse(&value, scripts::parse_packed_hold) {
            Ok(chunk) => chunk,
            Err(e) => {
                self.cmd_down(cx, e);
                return;
            }
        };
        if self.reload_cursor.is_none() {
            return;
        }
        for (hold, (deadline_ms, lines)) in chunk.entries {
            if self
                .reload_guard
                .get(hold.as_str())
                .is_some_and(|&at| at > chunk.seq)
            {
                continue;
            }
            self.reload_guard.insert(hold.as_str().into(), chunk.seq);
            self.set_hold(&hold, Some((deadline_ms, &lines)));
        }
        self.reload_through = self.reload_through.max(chunk.seq);
        if std::mem::take(&mut self.reload_again) {
            self.reload_cursor = Some("0".into());
            self.send_holds_chunk();
            return;
        }
        if chunk.cursor != "0" {
            self.reload_cursor = Some(chunk.cursor);
            self.send_holds_chunk();
            return;
        }
        self.reload_cursor = None;
        // Live here but neither in Redis nor set by a change since the reload began: ended
        // while the feed was away (see `ghost_expired`).
        let now = wall_ms();
        let ghosts: Vec<(Box<str>, u64)> = self
            .holds
            .live()
            .filter(|(name, _, _)| !self.reload_guard.contains_key(*name))
            .map(|(name, _, deadline_ms)| (name.into(), deadline_ms))
            .collect();
        let through = self.reload_through;
        for (hold, deadline_ms) in ghosts {
            if deadline_ms <= now {
                self.ghost_expired(&hold, deadline_ms, through);
            } else {
                self.holds.set(&hold, HoldState::Gone);
            }
        }
        self.maybe_drop_reload_guard();
    }

    /// The guard is needed only until the replica has passed every reload chunk's sequence.
    pub(super) fn maybe_drop_reload_guard(&mut self) {
        if self.reload_cursor.is_none() && self.applied_seq >= self.reload_through {
            self.reload_guard = HashMap::new();
        }
    }
}
