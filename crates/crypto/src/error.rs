//! The one error type of this crate.

/// Everything that can go wrong while sealing, opening or verifying.
///
/// Messages are for logs; [`CryptoError::code`] is for machines.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    /// The bytes do not follow the documented layout.
    #[error("malformed envelope: {0}")]
    Malformed(&'static str),
    /// The envelope's version byte is not one this build understands.
    #[error("unsupported envelope version {0}")]
    UnsupportedVersion(u8),
    /// A message id must be 1 to 64 ASCII bytes.
    #[error("message id must be 1 to 64 ASCII bytes")]
    BadMessageId,
    /// The recipient set cannot be sealed to.
    #[error("bad recipients: {0}")]
    BadRecipients(&'static str),
    /// The plaintext is larger than an envelope may carry.
    #[error("plaintext too large for one envelope")]
    TooLarge,
    /// A signature does not verify under the expected key.
    #[error("signature does not verify")]
    BadSignature,
    /// The envelope holds no key wrap for this device.
    #[error("envelope is not addressed to this device")]
    NotForThisDevice,
    /// This device's key wrap does not open.
    #[error("content key wrap does not open")]
    WrapFailed,
    /// The content does not decrypt under the unwrapped key.
    #[error("content does not decrypt")]
    ContentFailed,
    /// The decrypted content is not valid content JSON.
    #[error("decrypted content is not valid content JSON")]
    BadContent,
    /// A device list's signer is not one of the devices allowed to sign it.
    #[error("device list signer is not an approved device")]
    UnknownSigner,
    /// A successor device list names another user.
    #[error("device list is for another user")]
    WrongUser,
    /// A successor device list does not carry the next epoch.
    #[error("device list epoch {got} is not the next one ({expected})")]
    EpochNotNext {
        /// The epoch that should follow.
        expected: u64,
        /// The epoch the list carries.
        got: u64,
    },
    /// A device list breaks the shape rules.
    #[error("bad device list: {0}")]
    BadList(&'static str),
}

impl CryptoError {
    /// A short, stable, snake_case code for protocols and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::UnsupportedVersion(_) => "unsupported_version",
            Self::BadMessageId => "bad_message_id",
            Self::BadRecipients(_) => "bad_recipients",
            Self::TooLarge => "too_large",
            Self::BadSignature => "bad_signature",
            Self::NotForThisDevice => "not_for_this_device",
            Self::WrapFailed => "wrap_failed",
            Self::ContentFailed => "content_failed",
            Self::BadContent => "bad_content",
            Self::UnknownSigner => "unknown_signer",
            Self::WrongUser => "wrong_user",
            Self::EpochNotNext { .. } => "epoch_not_next",
            Self::BadList(_) => "bad_list",
        }
    }
}
