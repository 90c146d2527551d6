use std::error::Error as StdError;

type BoxError = Box<dyn StdError + Send + Sync>;

/// Why a rig, a request through it or a drill on it failed.
#[derive(Debug, thiserror::Error)]
pub enum RigError {
    /// A part could not be built or started: which part, and why.
    #[error("{what}: {source}")]
    Setup {
        what: String,
        #[source]
        source: BoxError,
    },
    /// The rig started but did not reach its ready state in time.
    #[error("{0}")]
    NotReady(String),
    /// An HTTP request through the rig failed.
    #[error("http: {0}")]
    Http(#[source] BoxError),
    /// A drill asked for something this rig does not have.
    #[error("drill: {0}")]
    Drill(String),
}

impl RigError {
    pub(crate) fn http(e: impl Into<BoxError>) -> Self {
        Self::Http(e.into())
    }
}

/// Names the part an error came from.
pub(crate) trait Context<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T, RigError>;
}

impl<T, E: Into<BoxError>> Context<T> for Result<T, E> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T, RigError> {
        self.map_err(|e| RigError::Setup {
            what: what(),
            source: e.into(),
        })
    }
}
