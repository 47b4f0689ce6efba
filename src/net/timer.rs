//! A hashed timer wheel driven by the poll timeout: no threads, no per-timer allocation.
//!
//! Each connection has at most one live entry. Timers are lazy: moving a connection's deadline
//! later (the common case: every read pushes the idle deadline out) costs nothing here; when the
//! old entry fires, the loop sees the deadline has moved and re-schedules it. Only a deadline
//! *earlier* than the armed entry adds an entry; the superseded one is recognised as stale by its
//! tick and dropped when it fires.

/// Timer resolution. Timeouts here are seconds-scale (handshake, idle, ping), so 50 ms is plenty
/// and keeps idle wakeups rare.
pub const TICK_MS: u64 = 50;

/// Slots in the wheel; entries further out than this many ticks park in the furthest slot and
/// are re-scheduled when it comes round.
const SLOTS: usize = 1024;

/// A wheel entry: the connection's slab index and the tick it was armed for, kept modulo 2^32,
/// in 8 bytes per armed connection (16 while it also held the generation and the whole tick).
///
/// An entry is only a hint to look at the connection in its slot: that slot may hold a later
/// connection by now, and two ticks 2^32 apart (6.8 years) look the same. Neither matters,
/// because the loop acts on the connection's own deadline (`Connection::deadline_tick`, whole),
/// never on the entry: an old entry taken for the live one makes the loop either re-arm the
/// connection's deadline or fire it when it is due anyway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub index: u32,
    /// The tick it was armed for, modulo 2^32.
    tick: u32,
}

const _: () = assert!(std::mem::size_of::<Entry>() == 8);

impl Entry {
    pub fn new(index: u32, tick: u64) -> Entry {
        Entry {
            index,
            // Modulo 2^32 on purpose (see the type's docs).
            tick: tick as u32,
        }
    }

    /// Whether this entry is the one armed for `armed_tick` (0: none is armed).
    pub fn is_armed_for(&self, armed_tick: u64) -> bool {
        armed_tick != 0 && self.tick == armed_tick as u32
    }
}

pub struct TimerWheel {
    slots: Vec<Vec<Entry>>,
    /// Every tick up to and including this one has been expired.
    done_tick: u64,
    len: usize,
}

impl Default for TimerWheel {
    fn default() -> Self {
        Self::new()
    }
}

impl TimerWheel {
    pub fn new() -> Self {
        TimerWheel {
            slots: (0..SLOTS).map(|_| Vec::new()).collect(),
            done_tick: 0,
            len: 0,
        }
    }

    pub fn tick_of_ms(ms: u64) -> u64 {
        ms.div_ceil(TICK_MS)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Arms an entry for the connection in slot `index` at `tick` (clamped into the wheel's
    /// horizon; a parked entry fires early and the caller re-schedules it).
    pub fn schedule(&mut self, index: u32, tick: u64) {
        let earliest = self.done_tick + 1;
        let latest = self.done_tick + SLOTS as u64;
        let slot_tick = tick.clamp(earliest, latest);
        self.slots[(slot_tick % SLOTS as u64) as usize].push(Entry::new(index, tick));
        self.len += 1;
    }

    /// Moves every entry whose slot is due at `now_tick` into `out`.
    pub fn expire(&mut self, now_tick: u64, out: &mut Vec<Entry>) {
        if self.len == 0 {
            self.done_tick = self.done_tick.max(now_tick);
            return;
        }
        let last = now_tick.min(self.done_tick + SLOTS as u64);
        while self.done_tick < last {
            self.done_tick += 1;
            let slot = &mut self.slots[(self.done_tick % SLOTS as u64) as usize];
            self.len -= slot.len();
            out.append(slot);
        }
        self.done_tick = self.done_tick.max(now_tick);
    }

    /// How long the loop may sleep before the next tick needs looking at.
    pub fn next_timeout_ms(&self, now_ms: u64) -> Option<u64> {
        if self.len == 0 {
            return None;
        }
        let next_tick_ms = (self.done_tick + 1) * TICK_MS;
        Some(next_tick_ms.saturating_sub(now_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u32, tick: u64) -> Entry {
        Entry::new(index, tick)
    }

    #[test]
    fn fires_at_its_tick_not_before() {
        let mut wheel = TimerWheel::new();
        wheel.schedule(1, 10);
        wheel.schedule(2, 3);
        let mut out = Vec::new();
        wheel.expire(2, &mut out);
        assert!(out.is_empty());
        wheel.expire(3, &mut out);
        assert_eq!(out, vec![entry(2, 3)]);
        out.clear();
        wheel.expire(9, &mut out);
        assert!(out.is_empty());
        wheel.expire(50, &mut out);
        assert_eq!(out, vec![entry(1, 10)]);
        assert!(wheel.is_empty());
    }

    #[test]
    fn far_deadlines_park_in_the_last_slot_and_fire_early() {
        let mut wheel = TimerWheel::new();
        wheel.schedule(7, 5000);
        let mut out = Vec::new();
        wheel.expire(SLOTS as u64 - 1, &mut out);
        assert!(out.is_empty());
        wheel.expire(SLOTS as u64, &mut out);
        assert_eq!(
            out.len(),
            1,
            "parked entry fires at the horizon for re-scheduling"
        );
        assert!(out[0].is_armed_for(5000));
    }

    #[test]
    fn past_deadlines_fire_on_the_next_tick() {
        let mut wheel = TimerWheel::new();
        let mut out = Vec::new();
        wheel.expire(100, &mut out);
        wheel.schedule(3, 4);
        wheel.expire(100, &mut out);
        assert!(out.is_empty());
        wheel.expire(101, &mut out);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn long_sleep_beyond_the_horizon_loses_nothing() {
        let mut wheel = TimerWheel::new();
        for i in 0..SLOTS as u64 * 2 {
            wheel.schedule(i as u32, i + 1);
        }
        let mut out = Vec::new();
        wheel.expire(10 * SLOTS as u64, &mut out);
        assert_eq!(out.len(), SLOTS * 2);
        assert!(wheel.is_empty());
    }

    #[test]
    fn next_timeout_is_the_next_tick() {
        let mut wheel = TimerWheel::new();
        assert_eq!(wheel.next_timeout_ms(0), None);
        wheel.schedule(1, 100);
        assert_eq!(wheel.next_timeout_ms(0), Some(TICK_MS));
        assert_eq!(wheel.next_timeout_ms(TICK_MS + 10), Some(0));
    }
}
