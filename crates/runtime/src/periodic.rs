//! The beat of a periodic background task (audit checkpoints, wave recovery, archiving): a tick at
//! once and then every period until shutdown. A run that overruns its period delays the next tick
//! rather than letting missed ticks fire back to back, so a slow store is not hammered to catch up.
//! What a run does and how it reports a failure stays with the task.

use std::time::Duration;

use tokio::time::{Interval, MissedTickBehavior};

use crate::Shutdown;

/// Ticks every period until shutdown: `while every.tick().await { … }`.
#[derive(Debug)]
pub struct Every {
    tick: Interval,
    shutdown: Shutdown,
}

impl Every {
    /// Ticks at once, then every `period`, until `shutdown`.
    ///
    /// # Panics
    /// When `period` is zero (as [`tokio::time::interval`]).
    pub fn new(period: Duration, shutdown: Shutdown) -> Self {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Every { tick, shutdown }
    }

    /// Waits for the next tick: true when it is time to run, false once shutdown is triggered.
    pub async fn tick(&mut self) -> bool {
        tokio::select! {
            _ = self.tick.tick() => true,
            () = self.shutdown.wait() => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn ticks_at_once_then_every_period_until_shutdown() {
        let shutdown = Shutdown::new();
        let mut every = Every::new(Duration::from_secs(10), shutdown.clone());
        let start = tokio::time::Instant::now();
        assert!(every.tick().await);
        assert_eq!(start.elapsed(), Duration::ZERO, "the first tick is at once");
        assert!(every.tick().await);
        assert_eq!(start.elapsed(), Duration::from_secs(10));
        // A run that overruns two periods: the next tick comes at once, then a full period later.
        tokio::time::sleep(Duration::from_secs(25)).await;
        assert!(every.tick().await);
        let late = start.elapsed();
        assert_eq!(late, Duration::from_secs(35));
        assert!(every.tick().await);
        assert_eq!(start.elapsed() - late, Duration::from_secs(10), "missed ticks don't fire back to back");
        shutdown.trigger();
        assert!(!every.tick().await);
    }
}
