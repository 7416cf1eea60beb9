//! CNI error codes: the one table the plugin and the agent answer with
//! (CNI spec 1.1, section "Error"; 100 and up are Margay's own).

/// Incompatible CNI version.
pub const INCOMPATIBLE_VERSION: u32 = 1;
/// Unsupported field in the network configuration.
pub const UNSUPPORTED_FIELD: u32 = 2;
/// Container unknown or does not exist (its network namespace is gone).
pub const UNKNOWN_CONTAINER: u32 = 3;
/// Invalid necessary environment variables (CNI_COMMAND, CNI_CONTAINERID, ...).
pub const INVALID_ENV: u32 = 4;
/// I/O failure.
pub const IO: u32 = 5;
/// Failed to decode content.
pub const DECODE: u32 = 6;
/// Invalid network configuration.
pub const INVALID_CONFIG: u32 = 7;
/// Try again later (a transient condition).
pub const TRY_AGAIN: u32 = 11;
/// The plugin is not available: it cannot serve ADD requests (STATUS).
pub const NOT_AVAILABLE: u32 = 50;
/// Not available, and existing containers may be affected (STATUS).
pub const NOT_AVAILABLE_EXISTING_AFFECTED: u32 = 51;
/// Margay: no address could be allocated.
pub const IPAM: u32 = 100;
/// Margay: the dataplane (kernel) refused or failed.
pub const DATAPLANE: u32 = 101;

/// The short name of a code, for logs and messages.
pub fn name(code: u32) -> &'static str {
    match code {
        INCOMPATIBLE_VERSION => "incompatible CNI version",
        UNSUPPORTED_FIELD => "unsupported field",
        UNKNOWN_CONTAINER => "unknown container",
        INVALID_ENV => "invalid environment",
        IO => "I/O failure",
        DECODE => "decode failure",
        INVALID_CONFIG => "invalid configuration",
        TRY_AGAIN => "try again later",
        NOT_AVAILABLE => "plugin not available",
        NOT_AVAILABLE_EXISTING_AFFECTED => "plugin not available, existing containers affected",
        IPAM => "address allocation failed",
        DATAPLANE => "dataplane failed",
        _ => "error",
    }
}
