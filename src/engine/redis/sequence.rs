//! The global change sequence: changes from the feed and from our own replies are applied to
//! the replica strictly in sequence order; tickets are resolved in order; the epoch shows data
//! loss.

use super::*;

impl RedisEngine {
    /// Records the outcome of `ticket` and reports every ticket done in order.
    pub(super) fn resolve(&mut self, ticket: u64, outcome: Outcome) {
        self.outcomes.insert(ticket, outcome);
        let before = self.done_through;
        while self
            .outcomes
            .range(self.done_through + 1..)
            .next()
            .is_some_and(|(&t, _)| t == self.done_through + 1)
        {
            self.done_through += 1;
        }
        if self.done_through != before {
            self.flush_remote();
            self.events.push(Progress::Through(self.done_through));
        }
    }

    pub(super) fn flush_remote(&mut self) {
        if !self.remote.is_empty() {
            self.events
                .push(Progress::Remote(std::mem::take(&mut self.remote)));
        }
    }

    /// Puts states into the replica (newer versions only) and returns what changed.
    pub(super) fn apply_states(&mut self, states: &[(String, Stock)]) -> Vec<(SkuId, Stock)> {
        let mut changed = Vec::with_capacity(states.len());
        for (name, stock) in states {
            match self.replica.intern(name) {
                Ok(sku) => {
                    if stock.version > self.replica.get(sku).version {
                        let _ = self.replica.restore(name, *stock);
                        changed.push((sku, *stock));
                    }
                }
                Err(e) => warn!("ignoring SKU `{name}` from Redis: {e}"),
            }
        }
        changed
    }

    /// Applies a buffered change that is next in sequence (or forced): to the replica and
    /// the hold mirror, then to its writer or to the subscribers (an expiry as
    /// [`Progress::HoldExpired`], which every process reports: the one whose connection took
    /// the hold pushes `hold_expired`, all broadcast the units freed).
    pub(super) fn apply_buffered(&mut self, seq: u64, buffered: Buffered) {
        let changed = self.apply_states(&buffered.changes);
        let mut expired = None;
        for event in &buffered.holds {
            if buffered.write.is_some()
                && matches!(event, HoldEvent::Live { .. })
                && !matches!(self.holds.state(event.hold(), 0), HoldState::Live { .. })
            {
                self.holds_taken_total += 1;
            }
            let applied = self.apply_hold_event(seq, event);
            if let HoldEvent::Expired {
                hold,
                at_ms,
                deadline_ms,
            } = event
            {
                // Not if a reload already reported it (see `ghost_expired`).
                if applied {
                    expired = Some((hold.clone(), at_ms.saturating_sub(*deadline_ms)));
                }
            }
        }
        match (buffered.write, expired) {
            (Some(answer), _) => {
                let outcome = self.applied_outcome(&answer, changed);
                self.resolve(answer.ticket, outcome);
            }
            (None, Some((hold, lag_ms))) => {
                self.flush_remote();
                self.events.push(Progress::HoldExpired {
                    hold,
                    changed,
                    lag_ms,
                });
            }
            (None, None) => self.remote.extend(changed),
        }
    }

    pub(super) fn applied_outcome(
        &mut self,
        answer: &Answer,
        changed: Vec<(SkuId, Stock)>,
    ) -> Outcome {
        let mut states = Vec::new();
        for (name, stock) in scripts::parse_states(&answer.results).unwrap_or_default() {
            if let Ok(sku) = self.replica.intern(name) {
                states.push((sku, stock));
            }
        }
        let view = answer
            .view_of
            .as_deref()
            .and_then(|hold| self.view(hold, wall_ms()).ok());
        Outcome::Applied {
            results: states,
            changed,
            duplicate: false,
            view,
        }
    }

    /// A change with its global sequence, from the feed or from our own reply.
    pub(super) fn offer(
        &mut self,
        seq: u64,
        changes: Vec<(String, Stock)>,
        holds: Vec<HoldEvent>,
        write: Option<Answer>,
        from_feed_ours: bool,
    ) {
        if seq <= self.applied_seq {
            // Already in the replica (the other path brought it first, with its hold events).
            if let Some(answer) = write {
                let changed = self.apply_states(&changes);
                let outcome = self.applied_outcome(&answer, changed);
                self.resolve(answer.ticket, outcome);
            }
            return;
        }
        let now = self.now_ms;
        let entry = self.reorder.entry(seq).or_insert_with(|| Buffered {
            since_ms: now,
            ..Buffered::default()
        });
        if entry.changes.is_empty() && entry.holds.is_empty() {
            entry.changes = changes;
            entry.holds = holds;
        }
        if write.is_some() {
            entry.write = write;
            entry.awaits_reply = false;
        } else if from_feed_ours && entry.write.is_none() {
            entry.awaits_reply = true;
        }
        if self.reorder.len() > REORDER_CHANGES_MAX {
            warn!("more than {REORDER_CHANGES_MAX} changes out of order; catching up");
            self.force_buffered();
            self.catch_up_needed = true;
            return;
        }
        self.drain_in_order();
    }

    /// Applies buffered changes while the next one in sequence is there.
    pub(super) fn drain_in_order(&mut self) {
        if self.catch_up_in_flight {
            return;
        }
        while let Some(entry) = self.reorder.first_entry() {
            if *entry.key() != self.applied_seq + 1 || entry.get().awaits_reply {
                break;
            }
            let (seq, buffered) = entry.remove_entry();
            self.applied_seq = seq;
            let waited_ms = self.now_ms.saturating_sub(buffered.since_ms);
            self.stats
                .feed_lag
                .observe(Duration::from_millis(waited_ms));
            self.apply_buffered(seq, buffered);
        }
        self.maybe_drop_reload_guard();
    }

    /// Applies every buffered change now, whatever the gaps (per SKU, newer versions only).
    pub(super) fn force_buffered(&mut self) {
        for (seq, buffered) in std::mem::take(&mut self.reorder) {
            self.apply_buffered(seq, buffered);
        }
    }

    pub(super) fn check_epoch(&mut self, epoch: &str) {
        if epoch.is_empty() || epoch == self.epoch {
            return;
        }
        // Nothing was ever seen: a new epoch loses nothing (a fresh Redis behind a fresh
        // inventory), so it is adopted quietly.
        if self.epoch.is_empty() || (self.applied_seq == 0 && self.replica.known_len() == 0) {
            self.epoch = epoch.to_string();
            return;
        }
        if self.data_lost.is_none() {
            let message = format!(
                "Redis lost its data (inventory epoch {} became {epoch}): writes are refused; \
                 restore Redis from its backup or append-only file, then restart stocksync",
                self.epoch
            );
            error!("{message}");
            self.stats.data_loss_total += 1;
            self.data_lost = Some(message);
        }
    }
}
