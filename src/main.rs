use clap::Parser;

fn main() {
    let cli = symb::cli::Cli::parse();
    std::process::exit(symb::cli::run(cli));
}
