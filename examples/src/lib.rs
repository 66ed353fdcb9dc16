//! Runnable examples of the saga library. Each binary in `src/bin` shows one
//! idea and runs over the in-memory backends by default.
