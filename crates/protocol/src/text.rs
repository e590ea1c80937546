//! Characters that text from another party must not carry as they are.

/// Bidirectional controls (which make "phone\u{202e}gnp.exe" read as
/// "phoneexe.png"), the Unicode line and paragraph separators, and
/// invisible format characters that make one text look like another (zero
/// width space, word joiner, byte order mark). The zero width joiner and
/// non-joiner are not among them: emoji and some scripts need them. Control
/// characters (`char::is_control`) are a separate test.
pub fn is_hidden_or_bidi(c: char) -> bool {
    matches!(c,
        '\u{061c}'
        | '\u{200b}'
        | '\u{200e}' | '\u{200f}'
        | '\u{2028}'..='\u{202e}'
        | '\u{2060}'..='\u{206f}'
        | '\u{feff}')
}
