//! symb's exit codes, in one place (the README's table lists the same).

use crate::engine::FailureClass;

/// How the process ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// 0: done, nothing to report.
    Success,
    /// 1: the machine failed (a write, the network, a tool, a stage's run),
    /// or a check found something to report (`status --exit-code`, `lint`),
    /// as `git diff --exit-code` does.
    Failed,
    /// 2: the input is wrong: the manifest, a file it names, an argument.
    BadInput,
    /// 3: an ONNX file missed its verification bounds.
    Verification,
    /// 128 + N: stopped by signal N (130 for Ctrl-C), as shells report it.
    Signal(i32),
}

impl Exit {
    /// The process exit status.
    pub fn code(self) -> i32 {
        match self {
            Exit::Success => 0,
            Exit::Failed => 1,
            Exit::BadInput => 2,
            Exit::Verification => 3,
            Exit::Signal(signal) => 128 + signal,
        }
    }

    /// A build's exit: success, or its first failure's class.
    pub fn of(failure: Option<FailureClass>) -> Exit {
        failure.map_or(Exit::Success, Exit::from)
    }
}

impl From<FailureClass> for Exit {
    fn from(class: FailureClass) -> Self {
        match class {
            FailureClass::Failed => Exit::Failed,
            FailureClass::BadInput => Exit::BadInput,
            FailureClass::Verification => Exit::Verification,
        }
    }
}
