//! What each reply on the command link and each message on the feed means.

use super::*;

impl RedisEngine {
    pub(super) fn on_cmd_reply(&mut self, cx: &mut Ctx<'_>, value: Value) {
        let Some(expect) = self.expects.pop_front() else {
            self.cmd_down(cx, "a reply nobody asked for".into());
            return;
        };
        match expect {
            Expect::Setup(what) => {
                if let Value::Error(e) = value {
                    error!("Redis refused {what}: {e}");
                    self.cmd_down(cx, format!("{what}: {e}"));
                } else {
                    self.reconnect_attempts = 0;
                }
            }
            Expect::Epoch => {
                if let Some(epoch) = value.as_str() {
                    let epoch = epoch.to_string();
                    self.check_epoch(&epoch);
                }
            }
            Expect::Write(write) => {
                self.writes_in_flight = self.writes_in_flight.saturating_sub(1);
                self.stats.round_trip.observe(write.sent.elapsed());
                self.on_write_reply(cx, *write, value);
            }
            Expect::CatchUp => self.on_catch_up_reply(cx, value),
            Expect::Expire(hold) => self.on_expire_reply(cx, hold, value),
            Expect::Holds => self.on_holds_chunk(cx, value),
            Expect::Probe => {
                self.probe_in_flight = false;
                let seq = value
                    .as_int()
                    .and_then(|n| u64::try_from(n).ok())
                    .unwrap_or(0);
                // A live feed brings, within a probe interval, every change the previous probe
                // saw in Redis; one that did not is silent.
                if self
                    .probe_target
                    .is_some_and(|target| self.applied_seq < target)
                {
                    warn!(
                        "Redis was at change {} a probe ago but the feed brought only {}: \
                         rebuilding the feed",
                        self.probe_target.unwrap_or(0),
                        self.applied_seq
                    );
                    self.probe_target = None;
                    self.feed_down(cx, "silent while changes go on".into());
                    self.feed_state = LinkState::Down { retry_at_ms: 0 };
                } else {
                    self.probe_target = (seq > self.applied_seq).then_some(seq);
                }
            }
        }
    }

    pub(super) fn on_write_reply(&mut self, cx: &mut Ctx<'_>, write: SentWrite, value: Value) {
        let items = match value {
            Value::Array(items) => items,
            Value::Error(e) if e.starts_with("NOSCRIPT") => {
                // The script cache was flushed: send the script itself, in the same place in
                // the pipeline order as far as this link goes.
                self.send_write(cx, write, true);
                return;
            }
            Value::Error(e) => {
                let error = ApiError::new(
                    ErrorCode::Unavailable,
                    format!("writes are unavailable: Redis refused the write: {e}"),
                );
                self.resolve(write.ticket, Outcome::refused(error));
                return;
            }
            other => {
                self.cmd_down(cx, format!("unexpected write reply {other:?}"));
                return;
            }
        };
        let tag = items.first().and_then(Value::as_str).unwrap_or("");
        match tag {
            "ok" if items.len() == 4 => {
                let seq = items[1].as_int().and_then(|n| u64::try_from(n).ok());
                let payload = items[2].as_str().and_then(scripts::parse_change);
                let results = items[3].as_str();
                let (Some(seq), Some(change), Some(results)) = (seq, payload, results) else {
                    self.cmd_down(cx, "malformed write reply".into());
                    return;
                };
                let epoch = change.epoch.to_string();
                self.check_epoch(&epoch);
                let changes = owned(change.states);
                let answer = Answer {
                    ticket: write.ticket,
                    results: results.to_string(),
                    view_of: write.view_of.clone(),
                };
                self.offer(seq, changes, change.holds, Some(answer), false);
            }
            "dup" if items.len() == 2 => {
                let answer = Answer {
                    ticket: write.ticket,
                    results: items[1].as_str().unwrap_or("").to_string(),
                    view_of: write.view_of.clone(),
                };
                let mut outcome = self.applied_outcome(&answer, Vec::new());
                if let Outcome::Applied { duplicate, .. } = &mut outcome {
                    *duplicate = true;
                }
                self.resolve(write.ticket, outcome);
            }
            "full" => {
                let error = ApiError::new(
                    ErrorCode::TooLarge,
                    format!(
                        "the inventory holds its maximum of {} SKUs; this write would add more",
                        self.config.skus_max
                    ),
                );
                let release = write.ops.iter().map(|op| op.sku).collect();
                self.resolve(write.ticket, Outcome::Refused { error, release });
            }
            "mismatch" => {
                let error =
                    ApiError::bad_request("idempotency key already used for a different request");
                self.resolve(write.ticket, Outcome::refused(error));
            }
            "err" if items.len() == 8 => {
                let outcome = self.rule_error(&write, &items);
                self.resolve(write.ticket, outcome);
            }
            "herr" if items.len() == 4 => {
                let outcome = self.hold_error(&write, &items);
                self.resolve(write.ticket, outcome);
            }
            _ => self.cmd_down(cx, format!("unexpected write reply {items:?}")),
        }
    }

    /// Rebuilds the refusal from the state the failing op saw, with the store's own rules, so
    /// both engines give the same error for the same request.
    pub(super) fn rule_error(&mut self, write: &SentWrite, items: &[Value]) -> Outcome {
        let n = |i: usize| {
            items[i]
                .as_int()
                .and_then(|v| u64::try_from(v).ok())
                .unwrap_or(0)
        };
        let index = n(1) as usize;
        let Some(op) = write.ops.get(index) else {
            return Outcome::refused(ApiError::new(ErrorCode::Internal, "bad script reply"));
        };
        let committed = Stock {
            on_hand: n(2),
            reserved: n(3),
            version: n(4),
        };
        let working = Stock {
            on_hand: n(5),
            reserved: n(6),
            version: committed.version,
        };
        let mut held = n(7);
        // stage_op asserts held <= reserved: a Redis that says otherwise gets the generic
        // refusal below instead of a panic.
        let error = if committed.is_valid() && working.is_valid() && held <= working.reserved {
            crate::stock::store::stage_op(op, committed, working, &mut held).err()
        } else {
            None
        }
        .unwrap_or(OpError::InvalidChange {
            action: op.action,
            amount: Some(i128::from(op.amount)),
        });
        let name = self.replica.name(op.sku).to_string();
        Outcome::Refused {
            error: ApiError::from_op(&error, &name).at(write.batch.then_some(index)),
            release: write.ops.iter().map(|op| op.sku).collect(),
        }
    }

    /// Rebuilds a hold rule's refusal (`{"herr", index, why, detail}`) as the embedded
    /// engine words it.
    pub(super) fn hold_error(&mut self, write: &SentWrite, items: &[Value]) -> Outcome {
        let index = items[1]
            .as_int()
            .and_then(|i| usize::try_from(i).ok())
            .unwrap_or(0);
        let why = items[2].as_str().unwrap_or("");
        let detail = items[3].as_str().unwrap_or("");
        let hold = write
            .holds
            .get(index)
            .and_then(|h| h.as_deref())
            .unwrap_or_default();
        let limits = self.config.hold_limits;
        let error = match HoldRefusal::parse(why, detail) {
            Some(HoldRefusal::Unknown) => HoldError::Unknown,
            Some(HoldRefusal::Expired) => HoldError::Expired,
            Some(HoldRefusal::TtlRequired) => HoldError::TtlRequired,
            Some(HoldRefusal::TtlRange(ttl_ms)) => HoldError::TtlOutOfRange {
                ttl_ms,
                max: limits.ttl_ms_max.min(TTL_MS_MAX),
            },
            Some(HoldRefusal::Full) => HoldError::HoldsFull {
                max: limits.holds_max,
            },
            Some(HoldRefusal::Lines) => HoldError::TooManyLines {
                max: limits.lines_max,
            },
            None => {
                return Outcome::refused(ApiError::new(ErrorCode::Internal, "bad script reply"))
            }
        };
        Outcome::Refused {
            error: ApiError::from_hold(&error, hold).at(write.batch.then_some(index)),
            release: write.ops.iter().map(|op| op.sku).collect(),
        }
    }

    pub(super) fn on_catch_up_reply(&mut self, cx: &mut Ctx<'_>, value: Value) {
        let chunk = match CatchUpChunk::parse(&value) {
            Ok(chunk) => chunk,
            Err(e) => {
                self.catch_up_in_flight = false;
                self.cmd_down(cx, e);
                return;
            }
        };
        self.check_epoch(&chunk.epoch);
        let states: Vec<(String, Stock)> = scripts::parse_states(&chunk.states)
            .unwrap_or_default()
            .into_iter()
            .map(|(n, s)| (n.to_string(), s))
            .collect();
        let changed = self.apply_states(&states);
        self.remote.extend(changed);
        if chunk.more {
            self.send_catch_up(&chunk.through);
            return;
        }
        self.catch_up_in_flight = false;
        self.applied_seq = self.applied_seq.max(chunk.seq);
        // Buffered changes the catch-up covered: their writers are answered now.
        while let Some(entry) = self.reorder.first_entry() {
            if *entry.key() > self.applied_seq {
                break;
            }
            let (seq, buffered) = entry.remove_entry();
            self.apply_buffered(seq, buffered);
        }
        self.drain_in_order();
        self.flush_remote();
        self.start_holds_reload();
    }

    pub(super) fn on_feed_message(&mut self, cx: &mut Ctx<'_>, value: Value) {
        let Value::Array(items) = value else {
            self.feed_down(cx, format!("unexpected feed reply {value:?}"));
            return;
        };
        match items.first().and_then(Value::as_str) {
            Some("subscribe") => {
                if self.last_error.is_some() {
                    log::info!("Redis change feed subscribed again; catching up");
                }
                self.feed_subscribed = true;
                self.reconnect_attempts = 0;
                // Anything published before the subscription took effect is read back.
                self.catch_up_needed = true;
            }
            Some("pong") => self.feed_ping_sent_ms = None,
            Some("message") if items.len() == 3 => {
                let Some(change) = items[2].as_str().and_then(scripts::parse_change) else {
                    warn!("malformed change on the feed; catching up");
                    self.catch_up_needed = true;
                    return;
                };
                let epoch = change.epoch.to_string();
                self.check_epoch(&epoch);
                let seq = change.seq;
                let ours = change.origin == self.origin;
                if let Some(last) = self.feed_seq {
                    if seq > last + 1 && seq > self.applied_seq + 1 {
                        // Pub/sub is at-most-once: a hole means lost messages.
                        self.stats.feed_gaps_total += 1;
                        self.catch_up_needed = true;
                    }
                }
                self.feed_seq = Some(seq);
                let states = owned(change.states);
                self.offer(seq, states, change.holds, None, ours);
            }
            _ => {}
        }
    }
}
