//! Who hears about which SKU, and getting each change to them: the subscription index and the
//! fan-out with conflation for slow consumers.

pub mod fanout;
pub mod sent;
pub mod subscriptions;

pub use fanout::Fanout;
pub use sent::SentVersions;
pub use subscriptions::Subscriptions;
