//! One module per subcommand.

pub mod aggregate;
