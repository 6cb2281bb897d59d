fn main() -> std::process::ExitCode {
    egret::cli::main()
}
