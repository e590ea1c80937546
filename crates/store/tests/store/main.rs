//! The store's promises, checked on both implementations.
//!
//! `contract` and `concurrent` are written against `dyn Store` and run on
//! SQLite and on PostgreSQL (a private server per test process, a fresh
//! database per test: confab-testpg); `sqlite` and `postgres` hold what
//! only one of them has.

mod common;
mod concurrent;
mod contract;
mod postgres;
mod sqlite;

/// One `#[tokio::test]` per scenario and store: `sqlite::name` and
/// `postgres::name`, each calling `name(backend)` of the module it is in.
#[macro_export]
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::sqlite().await).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::postgres().await).await
                }
            )*
        }
    };
}
