//! Where the next request goes, and when to stop trying: load balancing by
//! priority level, weight and power of two choices; passive outlier
//! detection; retry budgets.
//!
//! Everything here is a pure decision over values with the time passed in
//! (`now: Instant`): no sockets, no clock, no tasks. The sidecar and the
//! gateway own the state behind a lock and call in after every attempt.
#![forbid(unsafe_code)]

mod budget;
mod load;
mod outlier;
mod plan;

pub use budget::{BudgetConfig, RetryBudget};
pub use load::{Load, LoadGuard};
pub use outlier::{Ejection, Outlier, OutlierConfig};
pub use plan::{plan, Candidate, Group};
