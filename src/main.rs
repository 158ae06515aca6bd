use std::process::ExitCode;

fn main() -> ExitCode {
    lambda_ctl::cli::main()
}
