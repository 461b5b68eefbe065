//! Supervision of the daemon's long-lived tasks (the dispatcher, the writer, the sweeps, the
//! ops listener, the reload task).
//!
//! A daemon whose dispatcher died must not go on answering health checks: every long-lived task
//! is spawned through [`Supervisor::spawn`], and when one ends before shutdown was asked for, or
//! panics at any time, the first such [`TaskFailure`] is delivered to [`Failures::first`]. The
//! server then reports not ready (`/readyz` 503, gRPC health `NOT_SERVING`), drains, and returns
//! an error, so the process exits non-zero and its supervisor (systemd, compose, Kubernetes)
//! restarts it; the queue resumes from the database.
//!
//! [`FaultHooks`] let the tests make a named task panic or end on purpose. They are read from
//! `TOKEN_BROKER_TEST_FAIL_TASK` in debug builds only; a release build ignores the variable.

use std::{any::Any, future::Future, time::Duration};

use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// A supervised task that ended when it should not have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskFailure {
    /// The task's name, as given to [`Supervisor::spawn`].
    pub task: &'static str,
    /// What happened: "ended unexpectedly" or the panic's message.
    pub cause: String,
}

impl std::fmt::Display for TaskFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the {} task {}", self.task, self.cause)
    }
}

/// Spawns the long-lived tasks and watches them.
#[derive(Debug, Clone)]
pub struct Supervisor {
    /// Cancelled when shutdown begins: a task that ends after it has done its job.
    stop: CancellationToken,
    failures: mpsc::UnboundedSender<TaskFailure>,
    /// The tasks themselves, so shutdown can wait for them.
    tasks: TaskTracker,
    hooks: FaultHooks,
}

/// Where failures arrive.
#[derive(Debug)]
pub struct Failures(mpsc::UnboundedReceiver<TaskFailure>);

impl Failures {
    /// The first failure; pending for as long as every task runs.
    pub async fn first(&mut self) -> TaskFailure {
        match self.0.recv().await {
            Some(failure) => failure,
            // The supervisor is gone, so no task can fail any more.
            None => std::future::pending().await,
        }
    }
}

impl Supervisor {
    pub fn new(stop: CancellationToken, hooks: FaultHooks) -> (Supervisor, Failures) {
        let (failures, receiver) = mpsc::unbounded_channel();
        let supervisor = Supervisor {
            stop,
            failures,
            tasks: TaskTracker::new(),
            hooks,
        };
        (supervisor, Failures(receiver))
    }

    /// Runs `task` until it ends. Ending before shutdown, or panicking, is a failure.
    pub fn spawn<F>(&self, name: &'static str, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let handle = tokio::spawn(self.hooks.wrap(name, task));
        let stop = self.stop.clone();
        let failures = self.failures.clone();
        self.tasks.spawn(async move {
            let cause = match handle.await {
                Ok(()) if stop.is_cancelled() => return,
                Ok(()) => "ended unexpectedly".to_string(),
                Err(error) if error.is_panic() => {
                    format!("panicked: {}", panic_message(error.into_panic().as_ref()))
                }
                Err(error) => format!("was cancelled: {error}"),
            };
            let failure = TaskFailure { task: name, cause };
            tracing::error!(task = name, cause = %failure.cause, "a long-lived task failed");
            let _ = failures.send(failure);
        });
    }

    /// Waits up to `bound` for every supervised task to end (after `stop` was cancelled);
    /// returns whether they all did.
    pub async fn wait(&self, bound: Duration) -> bool {
        self.tasks.close();
        tokio::time::timeout(bound, self.tasks.wait()).await.is_ok()
    }
}

/// The text of a panic's payload (`panic!` with a literal or a formatted message).
fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_string()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "a panic without a message".to_string()
    }
}

/// The test-only variable: `TASK:panic` or `TASK:exit`, optionally `:AFTER_MS` (default 500),
/// makes the named supervised task panic or end that long after it starts.
pub const FAULT_ENV: &str = "TOKEN_BROKER_TEST_FAIL_TASK";

/// How a named task is made to fail, for the supervision tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultHooks(Option<Fault>);

#[derive(Debug, Clone, PartialEq, Eq)]
struct Fault {
    task: String,
    panic: bool,
    after: Duration,
}

impl FaultHooks {
    /// No faults: what every release build uses.
    pub fn none() -> FaultHooks {
        FaultHooks(None)
    }

    /// Reads [`FAULT_ENV`] in debug builds; always [`FaultHooks::none`] in release builds.
    pub fn from_env() -> FaultHooks {
        if !cfg!(debug_assertions) {
            return FaultHooks::none();
        }
        match std::env::var(FAULT_ENV) {
            Ok(value) => FaultHooks::parse(&value).unwrap_or_else(|| {
                tracing::warn!(
                    value,
                    "{FAULT_ENV} is not TASK:panic|exit[:AFTER_MS]; ignored"
                );
                FaultHooks::none()
            }),
            Err(_) => FaultHooks::none(),
        }
    }

    fn parse(value: &str) -> Option<FaultHooks> {
        let mut parts = value.split(':');
        let task = parts.next().filter(|t| !t.is_empty())?.to_string();
        let panic = match parts.next()? {
            "panic" => true,
            "exit" => false,
            _ => return None,
        };
        let after = match parts.next() {
            Some(millis) => Duration::from_millis(millis.parse().ok()?),
            None => Duration::from_millis(500),
        };
        if parts.next().is_some() {
            return None;
        }
        Some(FaultHooks(Some(Fault { task, panic, after })))
    }

    /// `task`, or, when a fault names it, `task` until the fault strikes.
    fn wrap<F>(&self, name: &'static str, task: F) -> impl Future<Output = ()> + Send + 'static
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let fault = self.0.clone().filter(|fault| fault.task == name);
        async move {
            let Some(fault) = fault else {
                return task.await;
            };
            tracing::warn!(task = name, panic = fault.panic, "test fault armed");
            tokio::select! {
                () = task => {}
                () = tokio::time::sleep(fault.after) => {
                    if fault.panic {
                        panic!("test fault injected into the {name} task");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_specifications_parse_strictly() {
        assert_eq!(
            FaultHooks::parse("dispatcher:panic:250"),
            Some(FaultHooks(Some(Fault {
                task: "dispatcher".into(),
                panic: true,
                after: Duration::from_millis(250),
            })))
        );
        assert!(FaultHooks::parse("writer:exit").is_some());
        for bad in [
            "",
            "writer",
            "writer:crash",
            ":panic",
            "writer:exit:soon",
            "a:exit:1:2",
        ] {
            assert_eq!(FaultHooks::parse(bad), None, "{bad:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_ends_or_panics_before_shutdown_is_reported() {
        let stop = CancellationToken::new();
        let (supervisor, mut failures) = Supervisor::new(stop.clone(), FaultHooks::none());
        supervisor.spawn("quitter", async {});
        let failure = failures.first().await;
        assert_eq!(failure.task, "quitter");
        assert_eq!(failure.cause, "ended unexpectedly");

        supervisor.spawn("panicker", async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            panic!("boom {}", 42);
        });
        let failure = failures.first().await;
        assert_eq!(failure.task, "panicker");
        assert_eq!(failure.cause, "panicked: boom 42");
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_ends_after_shutdown_is_not_a_failure() {
        let stop = CancellationToken::new();
        let (supervisor, mut failures) = Supervisor::new(stop.clone(), FaultHooks::none());
        let token = stop.clone();
        supervisor.spawn("worker", async move { token.cancelled().await });
        stop.cancel();
        assert!(supervisor.wait(Duration::from_secs(1)).await);
        drop(supervisor);
        let outcome = tokio::time::timeout(Duration::from_secs(5), failures.first()).await;
        assert!(outcome.is_err(), "no failure may be reported: {outcome:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_fault_hook_fails_only_the_task_it_names() {
        let stop = CancellationToken::new();
        let hooks = FaultHooks::parse("sweeps:exit:100").unwrap();
        let (supervisor, mut failures) = Supervisor::new(stop.clone(), hooks);
        supervisor.spawn("dispatcher", std::future::pending());
        supervisor.spawn("sweeps", std::future::pending());
        let failure = failures.first().await;
        assert_eq!(failure.task, "sweeps");
        assert_eq!(failure.cause, "ended unexpectedly");
    }
}
