//! The dispatcher's in-memory schedule of clients with waiting work, so that the cost of a
//! dispatch pass does not grow with the number of distinct client ids.
//!
//! A client is in one of three places:
//!
//! - **ready**: it may have a due job; clients are served from the front of this queue, a few
//!   per pass (as many as there are free worker slots), and go to its back afterwards, so
//!   clients take turns in the order their work arrived;
//! - **parked** until a time: its next job is not due yet, or its rate limit has no permit
//!   until then;
//! - **taken**: the current pass is looking at it. At the end of the pass ([`settle`]) a taken
//!   client that was neither parked nor forgotten goes back to the ready queue.
//!
//! A client with no waiting job at all is forgotten until it is announced again. Time is an
//! argument; nothing here reads a clock or the database.
//!
//! [`settle`]: ClientSchedule::settle

use std::collections::{BTreeSet, HashMap, VecDeque};

use crate::domain::job::UnixMillis;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Ready,
    Parked(UnixMillis),
    /// Looked at by the current pass; `announced` when new work arrived meanwhile.
    Taken {
        announced: bool,
    },
}

/// Clients with waiting work and when each is next worth a look.
#[derive(Debug, Default)]
pub struct ClientSchedule {
    /// Clients that may have due work, in turn order.
    ready: VecDeque<String>,
    /// Parked clients by wake-up time.
    parked: BTreeSet<(UnixMillis, String)>,
    /// Where each known client is.
    slots: HashMap<String, Slot>,
    /// The clients the current pass took, so that settling costs the pass, not the schedule.
    taken: Vec<String>,
}

impl ClientSchedule {
    /// `client` has new work (a submission, a scheduled retry, a rescued attempt): it is ready
    /// now, wherever it was parked.
    pub fn announce(&mut self, client: &str) {
        match self.slots.get_mut(client) {
            Some(Slot::Ready) => {}
            Some(Slot::Taken { announced }) => *announced = true,
            Some(Slot::Parked(until)) => {
                self.parked.remove(&(*until, client.to_string()));
                self.slots.insert(client.to_string(), Slot::Ready);
                self.ready.push_back(client.to_string());
            }
            None => {
                self.slots.insert(client.to_string(), Slot::Ready);
                self.ready.push_back(client.to_string());
            }
        }
    }

    /// Wakes the parked clients whose time has come, then takes up to `max` ready clients for
    /// this pass, in turn order.
    pub fn take(&mut self, now: UnixMillis, max: usize) -> Vec<String> {
        while let Some((until, _)) = self.parked.first()
            && *until <= now
        {
            if let Some((_, client)) = self.parked.pop_first() {
                self.slots.insert(client.clone(), Slot::Ready);
                self.ready.push_back(client);
            }
        }
        let count = max.min(self.ready.len());
        let taken: Vec<String> = self.ready.drain(..count).collect();
        for client in &taken {
            self.slots
                .insert(client.clone(), Slot::Taken { announced: false });
        }
        self.taken.extend(taken.iter().cloned());
        taken
    }

    /// Parks a taken client until `until` (its next job falls due, or its limiter refills). A
    /// client announced while taken stays ready instead.
    pub fn park(&mut self, client: &str, until: UnixMillis) {
        if let Some(Slot::Taken { announced: false }) = self.slots.get(client) {
            self.slots.insert(client.to_string(), Slot::Parked(until));
            self.parked.insert((until, client.to_string()));
        }
    }

    /// Forgets a taken client that has no waiting job. A client announced while taken stays
    /// ready instead.
    pub fn forget(&mut self, client: &str) {
        if let Some(Slot::Taken { announced: false }) = self.slots.get(client) {
            self.slots.remove(client);
        }
    }

    /// Ends a pass: every client still taken goes to the back of the ready queue.
    pub fn settle(&mut self) {
        for client in std::mem::take(&mut self.taken) {
            if let Some(slot @ Slot::Taken { .. }) = self.slots.get_mut(&client) {
                *slot = Slot::Ready;
                self.ready.push_back(client);
            }
        }
    }

    /// Whether a client is ready now.
    pub fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// When the first parked client wakes up.
    pub fn next_wake(&self) -> Option<UnixMillis> {
        self.parked.first().map(|(until, _)| *until)
    }

    /// Clients known to have waiting work.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: UnixMillis = UnixMillis(1_000);

    #[test]
    fn clients_take_turns_in_arrival_order() {
        let mut schedule = ClientSchedule::default();
        for client in ["a", "b", "c"] {
            schedule.announce(client);
        }
        schedule.announce("a");
        assert_eq!(schedule.take(T0, 2), ["a", "b"]);
        schedule.settle();
        assert_eq!(schedule.take(T0, 2), ["c", "a"]);
        schedule.settle();
        assert_eq!(schedule.take(T0, 5), ["b", "c", "a"]);
    }

    #[test]
    fn a_parked_client_wakes_at_its_time_or_when_announced() {
        let mut schedule = ClientSchedule::default();
        schedule.announce("a");
        schedule.announce("b");
        assert_eq!(schedule.take(T0, 2), ["a", "b"]);
        schedule.park("a", UnixMillis(2_000));
        schedule.park("b", UnixMillis(3_000));
        schedule.settle();
        assert!(!schedule.has_ready());
        assert_eq!(schedule.next_wake(), Some(UnixMillis(2_000)));
        assert!(schedule.take(UnixMillis(1_999), 5).is_empty());
        assert_eq!(schedule.take(UnixMillis(2_000), 5), ["a"]);
        schedule.settle();
        schedule.announce("b");
        assert_eq!(schedule.take(UnixMillis(2_001), 5), ["a", "b"]);
        assert_eq!(schedule.next_wake(), None);
    }

    #[test]
    fn forgotten_clients_leave_and_announced_ones_are_never_lost() {
        let mut schedule = ClientSchedule::default();
        schedule.announce("a");
        schedule.announce("b");
        assert_eq!(schedule.take(T0, 2), ["a", "b"]);
        // New work for "b" arrives while the pass thinks it has none.
        schedule.announce("b");
        schedule.forget("a");
        schedule.forget("b");
        schedule.park("b", UnixMillis(9_000));
        schedule.settle();
        assert_eq!(schedule.len(), 1);
        assert_eq!(schedule.take(T0, 5), ["b"]);
    }

    #[test]
    fn a_pass_costs_its_batch_not_the_number_of_clients() {
        let mut schedule = ClientSchedule::default();
        for n in 0..20_000 {
            schedule.announce(&format!("client-{n}"));
        }
        let taken = schedule.take(T0, 64);
        assert_eq!(taken.len(), 64);
        assert_eq!(taken[0], "client-0");
        for client in &taken {
            schedule.forget(client);
        }
        schedule.settle();
        assert_eq!(schedule.len(), 20_000 - 64);
        assert_eq!(schedule.take(T0, 1), ["client-64"]);
    }
}
