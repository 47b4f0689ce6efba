//! The two links to Redis: opening them (AUTH, SELECT, SCRIPT LOAD, the epoch, SUBSCRIBE),
//! losing them (every write in flight on the command link has an unknown outcome), backoff.

use super::*;

impl RedisEngine {
    /// Opens the links that are down and due.
    pub(super) fn ensure_links(&mut self, cx: &mut Ctx<'_>) {
        self.now_ms = cx.now_ms();
        if let LinkState::Down { retry_at_ms } = self.cmd_state {
            if self.now_ms >= retry_at_ms {
                self.open_cmd(cx);
            }
        }
        if let LinkState::Down { retry_at_ms } = self.feed_state {
            if self.now_ms >= retry_at_ms {
                self.open_feed(cx);
            }
        }
    }

    pub(super) fn open_cmd(&mut self, cx: &mut Ctx<'_>) {
        let mut link = match Link::connect(cx, self.addr) {
            Ok(link) => link,
            Err(e) => {
                self.cmd_down(cx, format!("connect: {e}"));
                return;
            }
        };
        for command in self.config.url.session_commands() {
            link.command(&command);
            self.expects.push_back(Expect::Setup("AUTH/SELECT"));
        }
        for script in scripts::ALL {
            link.command(&["SCRIPT", "LOAD", script]);
            self.expects.push_back(Expect::Setup("SCRIPT LOAD"));
        }
        // SET NX first: a fresh Redis gets its epoch here; a Redis that lost its data gets a
        // new one, which the GET then shows to differ from ours.
        match crate::cli::random_token() {
            Ok(fresh) => {
                link.command(&["SET", self.keys.epoch.as_str(), fresh.as_str(), "NX"]);
                self.expects.push_back(Expect::Setup("SET epoch"));
            }
            Err(e) => warn!("cannot make an epoch: {e}"),
        }
        link.command(&["GET", self.keys.epoch.as_str()]);
        self.expects.push_back(Expect::Epoch);
        self.cmd = Some(link);
        self.cmd_state = LinkState::Up;
        // Whatever changed while we were away is read again once the feed is back too.
        self.catch_up_needed = true;
    }

    pub(super) fn open_feed(&mut self, cx: &mut Ctx<'_>) {
        let mut link = match Link::connect(cx, self.addr) {
            Ok(link) => link,
            Err(e) => {
                self.feed_down(cx, format!("connect: {e}"));
                return;
            }
        };
        for command in self.config.url.session_commands() {
            if command[0] == "AUTH" {
                link.command(&command);
            }
        }
        link.command(&["SUBSCRIBE", self.keys.channel.as_str()]);
        self.feed = Some(link);
        self.feed_state = LinkState::Up;
        self.feed_subscribed = false;
        self.feed_seq = None;
        self.feed_ping_sent_ms = None;
        self.feed_ping_due_ms = self.now_ms + FEED_PING_INTERVAL_MS;
    }

    /// The command link failed: every write in flight has an unknown outcome.
    pub(super) fn cmd_down(&mut self, cx: &mut Ctx<'_>, why: String) {
        let link = self.cmd.take();
        self.drop_link(cx, link, "command link", why);
        let retry_at_ms = self.now_ms + self.backoff_ms();
        self.cmd_state = LinkState::Down { retry_at_ms };
        self.catch_up_in_flight = false;
        self.probe_in_flight = false;
        self.reload_cursor = None;
        self.reload_again = false;
        for expect in std::mem::take(&mut self.expects) {
            if let Expect::Expire(hold) = &expect {
                // Tried again once a link is back (the script is idempotent).
                self.expiring.remove(hold);
                let at = wall_ms() + EXPIRY_RETRY_MS;
                self.timers.push(Reverse((at, hold.clone())));
            }
            if let Expect::Write(write) = expect {
                let error = ApiError::new(
                    ErrorCode::Unavailable,
                    "the link to Redis broke before the write's reply: its outcome is unknown; \
                     retry it with the same idempotency key",
                );
                self.resolve(write.ticket, Outcome::refused(error));
            }
        }
        self.writes_in_flight = 0;
        // Changes Redis applied whose place in the sequence the feed has not confirmed yet:
        // their writers are answered now (the outcome is known), the replica takes them per
        // SKU (newer versions only), and the catch-up after reconnecting fills any gap.
        self.force_buffered();
    }

    pub(super) fn feed_down(&mut self, cx: &mut Ctx<'_>, why: String) {
        let link = self.feed.take();
        self.drop_link(cx, link, "change feed", why);
        let retry_at_ms = self.now_ms + self.backoff_ms();
        self.feed_state = LinkState::Down { retry_at_ms };
        self.feed_subscribed = false;
        self.feed_seq = None;
        self.catch_up_needed = true;
    }

    /// Closes a lost link and records why. Only a link that was up is news: failed attempts
    /// while Redis stays away are not (the reason is in /healthz), so the log is not flooded
    /// at every backoff step.
    pub(super) fn drop_link(
        &mut self,
        cx: &mut Ctx<'_>,
        link: Option<Link>,
        what: &str,
        why: String,
    ) {
        if let Some(link) = link {
            if link.is_connected() {
                warn!("Redis {what} lost: {why}");
                self.stats.reconnects_total += 1;
            } else {
                log::debug!("Redis {what} attempt failed: {why}");
            }
            link.close(cx);
        }
        self.last_error = Some(why);
    }

    pub(super) fn flush_links(&mut self, cx: &mut Ctx<'_>) {
        if let Some(link) = self.cmd.as_mut() {
            if let Err(e) = link.flush(cx) {
                self.cmd_down(cx, e.to_string());
            }
        }
        if let Some(link) = self.feed.as_mut() {
            if let Err(e) = link.flush(cx) {
                self.feed_down(cx, e.to_string());
            }
        }
    }

    pub(super) fn backoff_ms(&mut self) -> u64 {
        let cap = RECONNECT_MAX_MS.min(RECONNECT_BASE_MS << self.reconnect_attempts.min(10));
        self.reconnect_attempts = self.reconnect_attempts.saturating_add(1);
        // Full jitter (AWS architecture blog): processes that lost Redis together do not
        // come back together.
        jitter(cap)
    }
}
